"""Starting a stage: a checkpoint loaded next supplies every weight, so the policy is built
without drawing random ones (each rank used to draw its layers' full weights on the CPU, then
throw them away); without a checkpoint it is initialised as before."""

from __future__ import annotations

import json

from procs import run_python

STARTS = """
import json, os, sys, tempfile
import torch
from megatron_r1.config import load_config
from megatron_r1.parallel.launch_env import discover
from megatron_r1.session import end_session, start_session

def seeded_state(seed):
    torch.manual_seed(seed)  # what init_parallel does before the model is built
    return torch.get_rng_state()

tmp = tempfile.mkdtemp()
base = ["logging.tensorboard=false", "model.params_dtype=bf16"]
out = {}
fresh = start_session(load_config(None, [*base, f"logging.run_dir={tmp}/fresh"]),
                      discover({"MASTER_PORT": "29611"}))
out["fresh_drew"] = not torch.equal(torch.get_rng_state(), seeded_state(fresh.cfg.train.seed))
weights = {n: p.detach().clone() for n, p in fresh.model[0].named_parameters()}
fresh.save(0, {})
end_session(fresh)
loaded = start_session(load_config(None, [*base, f"logging.run_dir={tmp}/next",
                                          f"checkpoint.load_dir={tmp}/fresh/checkpoints",
                                          "checkpoint.load_optimizer=false"]),
                       discover({"MASTER_PORT": "29612"}))
out["loaded_drew"] = not torch.equal(torch.get_rng_state(), seeded_state(loaded.cfg.train.seed))
got = dict(loaded.model[0].named_parameters())
out["weights_equal"] = all(torch.equal(got[n].detach(), w) for n, w in weights.items())
# bf16: the optimizer's fp32 master weights follow the loaded weights, not the unset ones
main = [p for g in loaded.optimizer.optimizer.param_groups for p in g["params"]]
flat = torch.cat([p.detach().float().flatten() for p in main])
out["master_finite"] = bool(torch.isfinite(flat).all())
out["master_sum"] = float(flat.double().sum())
out["weights_sum"] = float(sum(w.double().sum() for w in weights.values()))
end_session(loaded)
print("RESULT " + json.dumps(out))
"""


def test_a_checkpoint_loaded_next_skips_random_initialisation():
    proc = run_python(STARTS, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(x for x in proc.stdout.splitlines()
                        if x.startswith("RESULT "))[len("RESULT "):])
    assert r["fresh_drew"]  # no checkpoint: the weights are drawn from the seeded generator
    assert not r["loaded_drew"]  # a checkpoint next: not one random number drawn
    assert r["weights_equal"] and r["master_finite"]
    # the master weights are the loaded bf16 weights in fp32 (exact: bf16 -> fp32 is exact)
    assert r["master_sum"] == r["weights_sum"]

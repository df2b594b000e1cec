"""Test support: a reward model's scores of (prompt, response) pairs, computed the plain way
at world size 1 (one unpadded sequence per forward, the score at its last id), to check the
scores GRPO's batched, data-parallel serving (megatron_r1.reward_serving) logged per row.

Usage: reward_score_worker.py PAIRS_JSON OUT_JSON section.key=value...  (the config names
reward.models; PAIRS_JSON is [[prompt, response], ...])."""

import json
import sys
from pathlib import Path

import torch

from megatron_r1.config import load_config
from megatron_r1.data.preference import reward_input_ids
from megatron_r1.data.template import render_prompt
from megatron_r1.reward_serving import load_reward_models
from megatron_r1.session import end_session, start_session

if __name__ == "__main__":
    pairs_file, out_file, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    session = start_session(cfg)
    served = load_reward_models(cfg, session)[0]
    (chunk,) = served.chunks
    scores = []
    with served.offload.on_device(), torch.no_grad():
        for prompt, response in json.loads(Path(pairs_file).read_text()):
            ids = reward_input_ids(served.reader.tokenizer,
                                   render_prompt(prompt, served.reader.template), response,
                                   served.reader.max_length)
            tokens = torch.tensor([ids], device=session.ctx.device)
            positions = torch.arange(len(ids), device=session.ctx.device).unsqueeze(0)
            scores.append(float(chunk(tokens, positions, None)[0, -1]))
    Path(out_file).write_text(json.dumps(scores))
    end_session(session)

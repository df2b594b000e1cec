"""The GRPO loss and its gradient do not depend on the data-parallel layout, on how the step
is split into micro-batches (fixed rows, a token budget, packed sequences: the denominator is
global and each micro-batch is only padded to its own longest row), nor on tensor, pipeline
or expert parallelism. gloo, world sizes 1 and 2; bf16 and fp16 within their precision.

Tolerance (fp32): relative 1e-5 for the loss, KL and gradient norm, and 1e-5 nats for each
token's log-prob, for the same reason as tests/e2e/test_sft_parallel.py: only the order of
floating-point sums changes (measured ~1e-7 relative, log-probs ~1e-6)."""

from __future__ import annotations

import json

import pytest

from procs import REPO, run_script

AGGREGATIONS = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
RTOL = 1e-5


def grpo_step(tmp_path, initial, nproc, *overrides, score=False, aggregations=None):
    args = [f"logging.run_dir={tmp_path}", f"checkpoint.load_dir={initial}",
            "checkpoint.load_optimizer=false", "train.global_batch_size=16",
            "grpo.kl_coef=0.05", *overrides]
    env = {"SCORE": "1"} if score else {}
    if aggregations:
        env["AGGREGATIONS"] = ",".join(aggregations)
    proc = run_script(REPO / "tests/e2e/grpo_step_worker.py", args, nproc=nproc,
                      env=env or None)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def assert_same_step(got, want, rtol=RTOL, logp_atol=1e-5):
    for key in ("loss", "kl", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=rtol), key
    if "logp" in want:
        assert got["logp"].keys() == want["logp"].keys()
        for row, values in want["logp"].items():
            assert got["logp"][row] == pytest.approx(values, abs=logp_atol), row


def test_loss_and_gradient_independent_of_split_and_dp(tmp_path, initial):
    """Each aggregation's step at each layout (one process per layout steps every aggregation
    from the same initial weights: grpo_step_worker's AGGREGATIONS)."""
    base = grpo_step(tmp_path / "one", initial, 1, "train.micro_batch_size=16",
                     aggregations=AGGREGATIONS)
    for name, nproc, overrides in (
            ("split", 1, ["train.micro_batch_size=2"]),
            ("dp2", 2, ["train.micro_batch_size=4"]),
            ("tp2", 2, ["train.micro_batch_size=8", "parallel.tensor=2"])):
        got = grpo_step(tmp_path / name, initial, nproc, *overrides, aggregations=AGGREGATIONS)
        for aggregation in AGGREGATIONS:
            assert_same_step(got[aggregation], base[aggregation])
    for aggregation in AGGREGATIONS:
        assert base[aggregation]["grad_norm"] > 0 and base[aggregation]["kl"] > 0
    # the aggregations really differ (a step that ignored the setting would pass the above)
    assert len({base[a]["loss"] for a in AGGREGATIONS}) == len(AGGREGATIONS)
    # started from a checkpoint: the policy was built without drawing random weights it would
    # throw away (issue 21; the step still equals the others, so every weight was loaded)
    assert base["drew_random_weights"] is False
    # started from a checkpoint: the policy was built without drawing random weights it would
    # throw away (issue 21; the step still equals the others, so every weight was loaded)
    assert base["drew_random_weights"] is False


@pytest.fixture(scope="module")
def padded(tmp_path_factory, initial):
    """One micro-batch of all 16 rows, padded to the longest: the reference computation."""
    return grpo_step(tmp_path_factory.mktemp("padded"), initial, 1, "train.micro_batch_size=16",
                     score=True)


@pytest.mark.parametrize(("nproc", "layout"), [
    (1, ["train.max_tokens_per_microbatch=128"]),
    (1, ["train.max_tokens_per_microbatch=128", "train.pack_sequences=true"]),
    (2, ["train.max_tokens_per_microbatch=128", "train.pack_sequences=true"]),
    (2, ["parallel.tensor=2", "train.micro_batch_size=4", "train.pack_sequences=true"]),
    (2, ["parallel.pipeline=2", "train.max_tokens_per_microbatch=128",
         "train.pack_sequences=true"]),
    (2, ["parallel.expert=2", "train.max_tokens_per_microbatch=128"]),
], ids=["budget", "packed", "dp2-packed", "tp2-packed", "pp2-packed", "ep2-budget"])
def test_token_budget_and_packing_change_only_the_padding(tmp_path, initial, padded, nproc,
                                                          layout):
    """Log-probs, loss and gradient equal the padded computation; the padding shrinks (the
    worker's rollout has one 40-token row among short ones, as R1's long tail)."""
    got = grpo_step(tmp_path, initial, nproc, *layout, score=True)
    assert_same_step(got, padded)
    assert got["padding_fraction"] < padded["padding_fraction"] / 2
    if "train.pack_sequences=true" in layout and "parallel.tensor=2" not in layout:
        assert got["padding_fraction"] == 0.0  # (TP2 rounds each pack to an even length)


def test_uniform_shapes_where_the_allgather_dispatcher_needs_them(tmp_path, initial, padded):
    """megatron's allgather dispatcher with a pipeline: no shape exchange between stages, so
    every micro-batch takes the step's longest row, and the results stay the padded ones."""
    got = grpo_step(tmp_path, initial, 2, "parallel.pipeline=2", "train.micro_batch_size=4",
                    "parallel.moe_token_dispatcher=allgather", score=True)
    assert_same_step(got, padded)
    assert got["padding_fraction"] == padded["padding_fraction"]


@pytest.mark.parametrize(("dtype", "rtol"), [("bf16", 2**-8), ("fp16", 2**-10)])
def test_16_bit_steps_match_fp32_within_their_precision(tmp_path, initial, padded, dtype,
                                                         rtol):
    """The same step with bf16/fp16 weights and activations (megatron's Float16Module, fp32
    master weights and logits): loss, KL and gradient norm within one 16-bit unit roundoff
    (bf16 2^-8, fp16 2^-10) of fp32, log-probs within 0.05 nats. Measured: bf16 1e-4 / 6e-4
    relative (loss / grad norm), 2.4e-3 nats; fp16 1e-5 / 8e-5. fp16 starts from a loss
    scale of 16: megatron's per-token loss sums overflow fp16 at the default 2^16 on this
    step (its scaler then skips it, as it would in training)."""
    extra = ["optim.initial_loss_scale=16"] if dtype == "fp16" else []
    got = grpo_step(tmp_path / dtype, initial, 2, "train.micro_batch_size=4",
                    f"model.params_dtype={dtype}", *extra, score=True)
    assert_same_step(got, padded, rtol=rtol, logp_atol=0.05)

"""Inputs and error checks shared by the GRPO loss tests (imported rootdir-relative by pytest).

The comparison rule (STYLE.md, "Kernels"): for every output and the gradient,
    max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + ATOL * (1 + max|ref64|)
where ref64 is grpo_token_loss_reference on the same inputs in float64 and torch_same_dtype
is the same reference on the kernel's input dtype (half logits upcast to float32, as eager
code does). NaN and inf must appear at the same places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megatron_r1.ops import GRPOTokenLoss, grpo_token_loss_reference

ATOL = 1e-6  # times (1 + the largest reference magnitude of that output)
OUTPUTS = ("loss", "logp", "kl", "entropy")


@dataclass
class Case:
    """One problem: logits [*lead, V] in the kernel's dtype, per-token tensors [*lead]."""

    logits: Tensor
    target: Tensor
    old_logp: Tensor | None
    ref_logp: Tensor | None
    advantages: Tensor
    mask: Tensor
    upstream: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


def make_case(lead: tuple[int, ...], vocab: int, dtype: torch.dtype, *, seed: int,
              kl_estimator: str = "k3", temperature: float = 1.0, extreme: bool = False,
              kl_coef: float = 0.05, clip_low: float = 0.2, clip_high: float = 0.28,
              log_ratio: float = 2.0, with_old: bool = True, with_ref: bool = True,
              device: str = "cpu") -> Case:
    """Random logits (optionally with +-1e4 entries), targets, and log-probs placed around the
    true logp so that ratios reach e^(+-log_ratio), far outside the clip range."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    x = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    target = torch.randint(0, vocab, (n,), generator=g)
    if extreme and vocab >= 3:
        rows = torch.arange(0, n, 3)
        x[rows, 0], x[rows, 1] = 1e4, -1e4
        target[rows[0::3]] = 0  # the dominant logit
        target[rows[1::3]] = 1  # the vanishing one: logp = -2e4 / T
    x = x.to(dtype)  # the values every implementation sees
    logp64 = torch.log_softmax(x.double() / temperature, -1).gather(-1, target[:, None])[:, 0]

    def uniform(scale: float) -> Tensor:
        return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * scale

    old = (logp64 - uniform(log_ratio)).float() if with_old else None
    ref = (logp64 + uniform(1.0)).float() if with_ref else None
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    if len(lead) == 2 and lead[0] > 1:
        mask.view(lead)[-1] = False  # a fully masked sequence
    upstream = torch.randn(n, generator=g)

    def shaped(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(lead).to(device)

    return Case(logits=x.reshape(*lead, vocab).to(device), target=shaped(target),
                old_logp=shaped(old), ref_logp=shaped(ref), advantages=shaped(adv),
                mask=shaped(mask), upstream=shaped(upstream),
                kwargs=dict(clip_low=clip_low, clip_high=clip_high,
                            kl_coef=kl_coef if with_ref else 0.0, kl_estimator=kl_estimator,
                            temperature=temperature))


def run_reference(case: Case, *, float64: bool) -> tuple[GRPOTokenLoss, Tensor]:
    """(outputs, d(sum upstream * loss)/d logits) of the reference, on CPU."""
    logits = case.logits.detach().cpu()
    dt = torch.float64 if float64 else torch.float32
    x = (logits.double() if float64 else logits.clone()).requires_grad_()

    def cpu(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.cpu().to(dt) if t.is_floating_point() else t.cpu()

    res = grpo_token_loss_reference(x, cpu(case.target), cpu(case.old_logp),
                                    cpu(case.ref_logp), cpu(case.advantages), cpu(case.mask),
                                    **case.kwargs)
    (res.loss * case.upstream.cpu().to(res.loss.dtype)).sum().backward()
    assert x.grad is not None
    return res, x.grad


def _max_err(a: Tensor, ref: Tensor) -> float:
    finite = ref.isfinite()
    if not finite.any():
        return 0.0
    return (a.double() - ref)[finite].abs().max().item()


def assert_matches(name: str, got: Tensor, same: Tensor, ref64: Tensor) -> None:
    """The 2x rule for one tensor (see the module docstring)."""
    got, same = got.detach().cpu(), same.detach().cpu()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.equal(got.isnan(), ref64.isnan()), f"{name}: NaN pattern differs"
    inf = ref64.isinf()
    assert torch.equal(got.double()[inf], ref64[inf]), f"{name}: inf pattern differs"
    scale = ref64[ref64.isfinite()].abs().max().item() if ref64.isfinite().any() else 0.0
    err_k, err_t = _max_err(got, ref64), _max_err(same, ref64)
    bound = 2 * err_t + ATOL * (1 + scale)
    assert err_k <= bound, (f"{name}: kernel error {err_k:.3g} > 2 x torch error {err_t:.3g} "
                            f"+ atol {ATOL * (1 + scale):.3g}")


def assert_clipped_matches(got: Tensor, case: Case, ref64: GRPOTokenLoss) -> None:
    """Equal clipped flags, except for ratios within 1e-5 of a clip bound (rounding ties)."""
    got = got.cpu()
    ratio = torch.exp(ref64.logp - case.old_logp.cpu().double()) if case.old_logp is not None \
        else torch.ones_like(ref64.logp)
    lo, hi = 1 - case.kwargs["clip_low"], 1 + case.kwargs["clip_high"]
    near = ((ratio - lo).abs() < 1e-5) | ((ratio - hi).abs() < 1e-5)
    assert got.dtype == torch.bool
    assert torch.equal(got[~near], ref64.clipped[~near]), "clipped flags differ"


def check_case(case: Case, got: GRPOTokenLoss, grad: Tensor | None,
               grad_cols: slice = slice(None)) -> None:
    """Every output (and the gradient, if given: columns grad_cols of the full vocabulary)."""
    same, grad_same = run_reference(case, float64=False)
    ref64, grad64 = run_reference(case, float64=True)
    for name in OUTPUTS:
        assert_matches(name, getattr(got, name), getattr(same, name), getattr(ref64, name))
    assert_clipped_matches(got.clipped, case, ref64)
    if grad is not None:
        assert grad.dtype == case.logits.dtype
        assert_matches("grad", grad, grad_same[..., grad_cols], grad64[..., grad_cols])


# ---- vocab-parallel worker (spawned by test_grpo_loss_vocab_parallel.py) --------------------
def shard_bounds(vocab: int, world: int, rank: int, even: bool) -> tuple[int, int]:
    """Columns of `rank`: equal shards (Megatron's layout) or uneven ones (first ranks wider)."""
    if even:
        assert vocab % world == 0
        per = vocab // world
        return rank * per, (rank + 1) * per
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def tp_scenarios(world: int, kernels: bool) -> list[dict[str, Any]]:
    modes = ["on", "off"] if kernels else ["off"]
    out = []
    for i, (dtype, fused) in enumerate([(d, m) for d in (torch.float32, torch.bfloat16)
                                        for m in modes]):
        out.append(dict(dtype=dtype, fused=fused, vocab=1000, even=True, seed=100 + i,
                        grad="backward", extreme=False, temperature=1.0))
        out.append(dict(dtype=dtype, fused=fused, vocab=1003, even=False, seed=200 + i,
                        grad="grad_scale_inplace", extreme=True, temperature=0.7))
        out.append(dict(dtype=dtype, fused=fused, vocab=1000, even=True, seed=300 + i,
                        grad="grad_scale_rescaled", extreme=False, temperature=1.0))
    return out


def tp_worker(rank: int, world: int, init_file: str) -> None:
    """Each rank computes its shard's loss and gradient; all must equal the unsharded result."""
    import torch.distributed as dist

    from megatron_r1.ops import grpo_token_loss
    from megatron_r1.ops.grpo_loss import fused_kernels_available

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for sc in tp_scenarios(world, fused_kernels_available("cpu")):
            case = make_case((3, 20), sc["vocab"], sc["dtype"], seed=sc["seed"],
                             extreme=sc["extreme"], temperature=sc["temperature"])
            a, b = shard_bounds(sc["vocab"], world, rank, sc["even"])
            x = case.logits[..., a:b].clone().requires_grad_()
            scale = None
            if sc["grad"] == "grad_scale_inplace":
                scale = case.upstream
            elif sc["grad"] == "grad_scale_rescaled":
                scale = case.upstream * torch.where(torch.arange(60).view(3, 20) % 2 == 0,
                                                    1.0, 0.5)
            res = grpo_token_loss(
                x, case.target, case.old_logp, case.ref_logp, case.advantages, case.mask,
                **case.kwargs, fused=sc["fused"], tp_group=dist.group.WORLD,
                vocab_start=None if sc["even"] else a, grad_scale=scale,
                inplace_grad=sc["grad"] == "grad_scale_inplace")
            (res.loss * case.upstream).sum().backward()
            try:
                check_case(case, res, x.grad, grad_cols=slice(a, b))
            except AssertionError as exc:
                raise AssertionError(f"rank {rank}/{world}, scenario {sc}: {exc}") from exc
    finally:
        dist.destroy_process_group()

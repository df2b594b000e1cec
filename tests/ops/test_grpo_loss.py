"""megatron_r1.ops.grpo_loss: the fused kernels (CPU in CI, CUDA where a GPU is) against the
float64 reference, their bindings' checks, the grad_scale / in-place protocol and fallback."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from ops._grpo_loss_cases import Case, check_case, make_case, run_reference

from megatron_r1.ops import _extension, grpo_token_loss, grpo_token_loss_reference
from megatron_r1.ops import grpo_loss_kernels as kernels
from megatron_r1.ops.grpo_loss import fused_kernels_available

# Kernel tests fail loudly when the extension did not build, unless it was skipped on purpose.
needs_ext = pytest.mark.skipif(os.environ.get("MEGATRON_R1_NO_EXTENSION") == "1",
                               reason="MEGATRON_R1_NO_EXTENSION=1: extension not built")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[gpu, needs_cuda])]


def _run(case: Case, **kw) -> tuple:
    """The public op on the case, then backward with the case's upstream gradient."""
    x = case.logits.clone().requires_grad_()
    res = grpo_token_loss(x, case.target, case.old_logp, case.ref_logp, case.advantages,
                          case.mask, fused="on", **case.kwargs, **kw)
    (res.loss * case.upstream).sum().backward()
    return res, x


@needs_ext
def test_extension_is_built() -> None:
    assert _extension.load() is not None, _extension.load_error()
    assert fused_kernels_available("cpu")


# ---- values and gradients against the float64 reference -------------------------------------
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize(("lead", "vocab"), [((64,), 1), ((6, 16), 1000), ((40,), 4099)])
@pytest.mark.parametrize(("temperature", "extreme"), [(1.0, False), (0.7, True)])
def test_matches_reference(device, dtype, kl_estimator, lead, vocab, temperature,
                           extreme) -> None:
    case = make_case(lead, vocab, dtype, seed=vocab + len(lead), kl_estimator=kl_estimator,
                     temperature=temperature, extreme=extreme, device=device)
    res, x = _run(case)
    assert res.loss.shape == lead and res.clipped.dtype == torch.bool
    check_case(case, res, x.grad)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip_low", [1.0, 10.0])
def test_no_lower_clip_from_clip_low_one(device, clip_low) -> None:
    """The R1 journal's epsilon 10: ratios e^-2 .. 1 are never clipped on the low side, so
    only A > 0 tokens above 1 + clip_high are clipped, in the kernel as in the spec."""
    case = make_case((64,), 300, torch.float32, seed=21, clip_low=clip_low, device=device)
    res, x = _run(case)
    check_case(case, res, x.grad)
    adv = case.advantages.to(res.clipped.device)
    assert res.clipped.any() and not (res.clipped & (adv < 0)).any()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_float16_and_optional_inputs(device) -> None:
    case = make_case((33,), 517, torch.float16, seed=3, with_old=False, with_ref=False,
                     device=device)
    res, x = _run(case)
    check_case(case, res, x.grad)
    assert not res.clipped.any()  # ratio 1 is never clipped
    assert torch.equal(res.kl, torch.zeros_like(res.kl))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_scale_matching_upstream(device, dtype, inplace) -> None:
    """Gradient computed in the forward for the known upstream: the backward is a no-op."""
    case = make_case((4, 50), 776, dtype, seed=11, device=device)  # 16-byte rows
    res, x = _run(case, grad_scale=case.upstream, inplace_grad=inplace)
    check_case(case, res, x.grad)
    assert (x.grad.data_ptr() == x.data_ptr()) == inplace
    if inplace:  # the logits now hold the gradient
        assert torch.equal(x.detach(), x.grad)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_other_upstream_is_rescaled(device) -> None:
    case = make_case((96,), 300, torch.float32, seed=5, device=device)
    scale = case.upstream.clone()
    scale[::3] *= 1.7  # a third of the rows get rescaled in the backward
    res, x = _run(case, grad_scale=scale, inplace_grad=True)
    check_case(case, res, x.grad)
    # bfloat16: factors of two rescale exactly, so the 2x rule still holds
    case = make_case((96,), 300, torch.bfloat16, seed=6, device=device)
    res, x = _run(case, grad_scale=case.upstream * 0.5)
    check_case(case, res, x.grad)


@needs_ext
def test_grad_scale_zero_on_a_live_row_gives_nan_rows() -> None:
    case = make_case((20,), 64, torch.float32, seed=2)
    case.mask[:] = True
    scale = case.upstream.clone()
    scale[3] = 0.0  # the forward writes a zero gradient for row 3 ...
    _, x = _run(case, grad_scale=scale)
    assert x.grad[3].isnan().all()  # ... which cannot be rescaled: loud, not silently wrong
    _, grad64 = run_reference(case, float64=True)
    others = torch.arange(20) != 3
    torch.testing.assert_close(x.grad[others].double(), grad64[others], rtol=1e-4, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_writes_over_logits(device) -> None:
    case = make_case((64,), 1000, torch.bfloat16, seed=9, device=device)
    res, x = _run(case, inplace_grad=True)
    assert x.grad.data_ptr() == x.data_ptr()
    check_case(case, res, x.grad)


@needs_ext
def test_no_grad_leaves_logits_alone() -> None:
    case = make_case((16,), 100, torch.float32, seed=1)
    x = case.logits.clone().requires_grad_()
    with torch.no_grad():
        res = grpo_token_loss(x, case.target, case.old_logp, case.ref_logp, case.advantages,
                              case.mask, grad_scale=case.upstream, inplace_grad=True,
                              fused="on", **case.kwargs)
    assert torch.equal(x.detach(), case.logits)
    check_case(case, res, None)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_row_strided_logits(device) -> None:
    """A 2-D view with row stride > V (e.g. a slice of wider logits) needs no copy."""
    case = make_case((32,), 250, torch.bfloat16, seed=4, device=device)
    wide = torch.full((32, 264), 7.0, dtype=torch.bfloat16, device=device)
    wide[:, :250] = case.logits
    view = wide[:, :250].requires_grad_()
    res = grpo_token_loss(view, case.target, case.old_logp, case.ref_logp, case.advantages,
                          case.mask, grad_scale=case.upstream, inplace_grad=True, fused="on",
                          **case.kwargs)
    (res.loss * case.upstream).sum().backward()
    check_case(case, res, view.grad)
    assert torch.equal(wide[:, 250:], torch.full_like(wide[:, 250:], 7.0))  # padding untouched


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_masked_padding_may_hold_garbage(device) -> None:
    case = make_case((2, 40), 128, torch.float32, seed=8, device=device)
    off = ~case.mask
    case.target[off] = -100
    for t in (case.old_logp, case.ref_logp, case.advantages):
        t[off] = float("nan")
    res, x = _run(case)
    assert torch.equal(res.loss[off], torch.zeros_like(res.loss[off]))
    assert torch.equal(res.kl[off], torch.zeros_like(res.kl[off]))
    assert not res.clipped[off].any()
    assert res.logp[off].isnan().all() and res.entropy.isfinite().all()
    assert torch.equal(x.grad[off], torch.zeros_like(x.grad[off]))
    check_case(case, res, x.grad)


@needs_ext
@pytest.mark.parametrize("grad_scale", [False, True])
def test_fully_masked_batch_has_zero_loss_and_gradient(grad_scale) -> None:
    case = make_case((3, 7), 300, torch.bfloat16, seed=17)
    case.mask[:] = False
    res, x = _run(case, grad_scale=case.upstream if grad_scale else None)
    assert torch.equal(res.loss, torch.zeros_like(res.loss))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))
    check_case(case, res, x.grad)


@needs_ext
def test_invalid_target_on_a_live_token_is_nan() -> None:
    case = make_case((8,), 10, torch.float32, seed=0)
    case.mask[:] = True
    case.target[2] = 10  # == V: out of range
    res, _ = _run(case)
    ref = grpo_token_loss_reference(case.logits, case.target, case.old_logp, case.ref_logp,
                                    case.advantages, case.mask, **case.kwargs)
    assert res.logp[2].isnan() and res.loss[2].isnan() and ref.loss[2].isnan()
    assert res.loss[torch.arange(8) != 2].isfinite().all()


# ---- every output element is written ------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_grad", [False, True])
def test_poisoned_outputs_are_all_written(device, with_grad) -> None:
    ext = _extension.load()
    case = make_case((50,), 1003, torch.bfloat16, seed=12, device=device)
    n, f32 = 50, torch.float32
    outs = [torch.full((n,), float("nan"), device=device) for _ in range(7)]
    clipped = torch.ones(n, dtype=torch.bool, device=device)
    grad = torch.full_like(case.logits, float("nan"))
    ext.grpo_fwd(case.logits, case.target, case.old_logp, case.ref_logp, case.advantages,
                 case.mask.to(f32), case.upstream if with_grad else None,
                 grad if with_grad else None, *outs[:3], clipped, *outs[3:], 0.2, 0.28, 0.05, 2,
                 1.0)
    assert all(o.isfinite().all() for o in outs)
    ref = grpo_token_loss_reference(case.logits, case.target, case.old_logp, case.ref_logp,
                                    case.advantages, case.mask, **case.kwargs)
    assert torch.equal(clipped.cpu(), ref.clipped.cpu())
    if with_grad:
        assert grad.isfinite().all()
    stats = [torch.full((n,), float("nan"), device=device) for _ in range(4)]
    ext.grpo_stats(case.logits, case.target, *stats, 1.0, 0)
    assert all(s.isfinite().all() for s in stats)
    grad = torch.full_like(case.logits, float("nan"))
    ext.grpo_grad(case.logits, case.target, outs[4], outs[5], outs[6], grad, 1.0, 0)
    assert grad.isfinite().all()


@needs_ext
def test_public_outputs_written_under_uninitialized_fill(monkeypatch) -> None:
    """With deterministic fill, torch.empty returns NaN: any unwritten element would show."""
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    case = make_case((3, 30), 501, torch.float32, seed=13)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        res, x = _run(case)
    finally:
        torch.use_deterministic_algorithms(before)
    for name in ("loss", "logp", "kl", "entropy"):
        assert getattr(res, name).isfinite().all(), name
    assert x.grad.isfinite().all()


# ---- the op layer -----------------------------------------------------------------------
@needs_ext
def test_custom_ops_pass_opcheck() -> None:
    case = make_case((12,), 70, torch.float32, seed=14)
    f32 = torch.float32
    rows = (case.target, case.old_logp, case.ref_logp, case.advantages, case.mask.to(f32))
    params = (0.2, 0.28, 0.05, 2, 0.9)
    x = case.logits
    outs = kernels.grpo_fwd(x, *rows, *params)
    lnorm, rmax, coef = outs[6], outs[5], case.upstream * outs[7]
    checks = [
        (kernels.grpo_fwd, (x, *rows, *params)),
        (kernels.grpo_fwd_grad, (x, *rows, case.upstream, *params)),
        (kernels.grpo_fwd_grad_, (x.clone(), *rows, case.upstream, *params)),
        (kernels.grpo_stats, (x, case.target, 0.9, 0)),
        (kernels.grpo_grad, (x, case.target, rmax, lnorm, coef, 0.9, 0)),
        (kernels.grpo_grad_, (x.clone(), case.target, rmax, lnorm, coef, 0.9, 0)),
        (kernels.grpo_scale_rows_, (x.clone(), torch.rand(12))),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_fused_forward_equals_forward_then_grad() -> None:
    """The single-pass op and the two-pass ops compute the same gradient bitwise (CPU)."""
    case = make_case((30,), 999, torch.bfloat16, seed=15)
    rows = (case.target, case.old_logp, case.ref_logp, case.advantages, case.mask.float())
    params = (0.2, 0.28, 0.05, 2, 1.0)
    *outs, grad = kernels.grpo_fwd_grad(case.logits, *rows, case.upstream, *params)
    outs2 = kernels.grpo_fwd(case.logits, *rows, *params)
    for a, b in zip(outs, outs2):
        assert torch.equal(a, b)
    grad2 = kernels.grpo_grad(case.logits, case.target, outs[5], outs[6],
                              (case.upstream * outs[7]).contiguous(), 1.0, 0)
    assert torch.equal(grad, grad2)


@needs_ext
def test_fused_op_compiles_without_graph_breaks() -> None:
    """torch.compile(fullgraph=True) traces the public function, custom ops and autograd."""
    case = make_case((8,), 100, torch.float32, seed=18)

    def step(x, grad_scale):
        res = grpo_token_loss(x, case.target, case.old_logp, case.ref_logp, case.advantages,
                              case.mask, fused="on", grad_scale=grad_scale, **case.kwargs)
        return (res.loss * case.upstream).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x1, x2 = (case.logits.clone().requires_grad_() for _ in range(2))
    compiled(x1, case.upstream).backward()
    step(x2, case.upstream).backward()
    assert torch.equal(x1.grad, x2.grad)


# ---- errors -----------------------------------------------------------------------------
@needs_ext
def test_binding_checks_name_the_tensor() -> None:
    ext = _extension.load()
    n, v = 8, 10
    x, t = torch.randn(n, v), torch.zeros(n, dtype=torch.long)
    o = [torch.empty(n) for _ in range(7)]
    clipped = torch.empty(n, dtype=torch.bool)

    def fwd(**bad):
        args = dict(logits=x, target=t, old_logp=None, ref_logp=None, advantages=torch.randn(n),
                    mask=torch.ones(n), grad_scale=None, grad=None, loss=o[0], logp=o[1],
                    kl=o[2], clipped=clipped, entropy=o[3], row_max=o[4], log_norm=o[5],
                    dlogp=o[6], clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator=2,
                    temperature=1.0)
        ext.grpo_fwd(**{**args, **bad})

    with pytest.raises(ValueError, match=r"advantages must have shape \[N\] = \[8\], got float32 \[9\]"):
        fwd(advantages=torch.randn(n + 1))
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16, got int32"):
        fwd(logits=x.int())
    with pytest.raises(TypeError, match="target must be int64, got int32"):
        fwd(target=t.int())
    with pytest.raises(ValueError, match="logits must have contiguous rows"):
        fwd(logits=x.t().contiguous().t())
    with pytest.raises(ValueError, match="old_logp must be contiguous"):
        fwd(old_logp=torch.randn(n, 2)[:, 0])
    with pytest.raises(ValueError, match="grad must be given"):
        fwd(grad_scale=torch.ones(n))
    with pytest.raises(ValueError, match="grad must have the shape of logits"):
        fwd(grad_scale=torch.ones(n), grad=torch.empty(n, v + 1))
    buf = torch.randn(n * v + 1)
    with pytest.raises(ValueError, match="grad must either be logits itself"):
        fwd(logits=buf[:-1].view(n, v), grad_scale=torch.ones(n), grad=buf[1:].view(n, v))
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fwd(temperature=0.0)
    with pytest.raises(ValueError, match="kl_estimator must be 0"):
        fwd(kl_estimator=3)
    with pytest.raises(TypeError, match="clipped must be bool"):
        fwd(clipped=torch.empty(n))
    with pytest.raises(ValueError, match="ratio must have shape"):
        ext.grpo_scale_rows(x, torch.ones(n - 1))


def test_public_api_errors() -> None:
    case = make_case((6,), 20, torch.float32, seed=0)
    args = (case.logits, case.target, case.old_logp, case.ref_logp, case.advantages, case.mask)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        grpo_token_loss(*args, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"ref_logp is None but kl_coef=0\.1"):
        grpo_token_loss(*args[:3], None, *args[4:], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"mask must have the logits' leading shape \(6,\)"):
        grpo_token_loss(*args[:5], case.mask[:5])
    with pytest.raises(ValueError, match="fused='yes'"):
        grpo_token_loss(*args, fused="yes")
    with pytest.raises(ValueError, match=r"clip_low=-0\.1: must be >= 0"):
        grpo_token_loss(*args, clip_low=-0.1)
    with pytest.raises(ValueError, match="vocab_start=5 needs a tp_group"):
        grpo_token_loss(*args, vocab_start=5)
    with pytest.raises(ValueError, match="fused='on': the kernels take"):
        grpo_token_loss(case.logits.double(), *args[1:], fused="on")
    with pytest.raises(ValueError, match="cannot be viewed as"):
        grpo_token_loss(torch.randn(2, 6, 20).transpose(0, 1).contiguous().transpose(0, 1)
                        .reshape(2, 6, 20)[:, ::2], case.target.view(6)[:6].view(1, 6)
                        .expand(2, 6)[:, ::2], None, None, torch.zeros(2, 3),
                        torch.ones(2, 3), fused="auto")


def test_fused_off_is_the_reference() -> None:
    case = make_case((2, 9), 33, torch.bfloat16, seed=7)
    args = (case.logits, case.target, case.old_logp, case.ref_logp, case.advantages, case.mask)
    got = grpo_token_loss(*args, fused="off", **case.kwargs)
    ref = grpo_token_loss_reference(*args, **case.kwargs)
    for name in ("loss", "logp", "kl", "clipped", "entropy"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_load_error", "ImportError: simulated")
    monkeypatch.setattr(_extension, "_warned", set())


def test_on_without_extension_is_an_error(no_extension) -> None:
    case = make_case((4,), 10, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"fused='on' but megatron_r1._C is not built \(ImportError: simulated\)"):
        grpo_token_loss(case.logits, case.target, case.old_logp, case.ref_logp,
                        case.advantages, case.mask, fused="on", **case.kwargs)


def test_auto_without_extension_warns_once_and_uses_the_reference(no_extension) -> None:
    case = make_case((4, 5), 50, torch.float32, seed=1)
    args = (case.logits, case.target, case.old_logp, case.ref_logp, case.advantages, case.mask)
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference .* not built"):
        got = grpo_token_loss(*args, fused="auto", **case.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grpo_token_loss(*args, fused="auto", **case.kwargs)
    ref = grpo_token_loss_reference(*args, **case.kwargs)
    assert torch.equal(got.loss, ref.loss)


# ---- GPU-only: the single-pass cluster path and CPU/CUDA agreement ----------------------
@gpu
@needs_cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [151936, 129280, 151936 // 8, 4099])
def test_cuda_single_pass_plans(dtype, vocab) -> None:
    """Large rows use a thread-block cluster, small ones one block; all match the reference."""
    ext = _extension.load()
    assert ext.has_cuda()
    cluster, chunk_bytes = ext.cuda_fused_plan(torch.empty(0, dtype=dtype, device="cuda"), vocab)
    esize = torch.empty(0, dtype=dtype).element_size()
    assert cluster >= 1 and chunk_bytes * cluster >= vocab * esize
    if vocab * esize > 200 * 1024:
        assert cluster > 1
    case = make_case((6,), vocab, dtype, seed=vocab, extreme=True, device="cuda")
    res, x = _run(case, grad_scale=case.upstream, inplace_grad=True)
    check_case(case, res, x.grad)


@gpu
@needs_cuda
@needs_ext
def test_cuda_matches_cpu_kernel() -> None:
    """Both back ends pass the 2x rule and agree with each other to rounding."""
    cpu_case = make_case((64,), 32000, torch.bfloat16, seed=21)
    cuda_case = make_case((64,), 32000, torch.bfloat16, seed=21, device="cuda")
    cpu_res, cpu_x = _run(cpu_case)
    cuda_res, cuda_x = _run(cuda_case, grad_scale=cuda_case.upstream)
    check_case(cuda_case, cuda_res, cuda_x.grad)
    for name in ("loss", "logp", "kl", "entropy"):
        torch.testing.assert_close(getattr(cuda_res, name).cpu(), getattr(cpu_res, name),
                                   rtol=2e-5, atol=2e-5)
    # bfloat16 gradients may round to neighbouring values: one ulp (2^-8 relative)
    torch.testing.assert_close(cuda_x.grad.cpu().float(), cpu_x.grad.float(), rtol=2**-7,
                               atol=1e-6 * cpu_x.grad.float().abs().max().item())


def test_auto_means_the_pytorch_path_on_cuda_until_the_kernel_passes_the_gpu_checks(
        monkeypatch) -> None:
    """Even where the CUDA kernels are built, `auto` does not pick them (they have never run
    on a GPU); it says once how to opt in. `on` still selects them; CPU keeps its kernel."""
    from megatron_r1.ops.grpo_loss import uses_kernels

    monkeypatch.setattr(_extension, "_has_cuda", True)  # as if built with a CUDA toolkit
    monkeypatch.setattr(_extension, "_warned", set())
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match=r"PyTorch reference on CUDA: the CUDA kernel has "
                                            r"not passed the GPU checks .* grpo.fused_loss=on"):
        assert not uses_kernels("auto", torch.bfloat16, cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not uses_kernels("auto", torch.bfloat16, cuda)
    if _extension.load() is not None:  # the extension is built here (make install)
        assert uses_kernels("on", torch.bfloat16, cuda)
        assert uses_kernels("auto", torch.float32, torch.device("cpu"))
    assert not uses_kernels("off", torch.bfloat16, cuda)

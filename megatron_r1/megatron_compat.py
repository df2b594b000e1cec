"""Every redirection megatron-core needs to run where it was not written to run. One module.

Layer L2. megatron-core assumes CUDA: it creates tensors with `device="cuda"`, asks for
`torch.cuda.current_device()`, keeps CUDA RNG states, opens CUDA streams and checks
`tensor.type() == "torch.cuda.FloatTensor"`. On a CPU-only torch those calls raise, so the CPU
redirections below are applied only when CUDA is absent; each names the megatron call it
serves, and tests/test_megatron_compat.py proves each one is still needed and still works
(dropping it must make that call fail; keeping it must make the call succeed).

Two fixes are not about CPUs but about megatron-core 0.16.1 without Transformer Engine (a GPU
job without TE needs them too): they are applied whenever TE does not import.

The CPU redirections change only calls that cannot succeed on a CPU-only torch anyway, so
they cannot alter a code path that worked before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED: list[str] = []
_STANDIN = "cpu"
"""The device that stands in for CUDA in the redirections below."""


def use_meta_as_cuda() -> None:
    """Test aid (tests/e2e/device_guard_worker.py): let the `meta` device stand in for CUDA
    instead of the CPU, so that a model placed on `meta` meets megatron's own "CUDA" tensors
    there and any host tensor that reaches it fails as it would on a GPU."""
    global _STANDIN
    _STANDIN = "meta"


# --- 1. RNG states: megatron.core.tensor_parallel.random --------------------------------------
def _rng_tracker_on_cpu_generator() -> None:
    """`model_parallel_cuda_manual_seed` -> `CudaRNGStatesTracker.add` calls
    `torch.cuda.get_rng_state()`, and `tracker.fork()` (weight init, dropout in TP regions)
    swaps CUDA generator states. On CPU the generator that matters is the CPU one, so the
    tracker keeps and swaps CPU generator states instead; semantics are unchanged (each
    tracked stream of random numbers stays seeded and separate)."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> Any:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add


# --- 2. CUDA streams in the all-to-all token dispatcher ----------------------------------------
class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def wait_stream(self, other: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullStream:
        return self

    def synchronize(self) -> None:
        pass


def _alltoall_dispatcher_without_streams() -> None:
    """`MoEAlltoAllTokenDispatcher.__init__` creates `torch.cuda.Stream()` and
    `_maybe_dtoh_and_synchronize` copies the split sizes to the host on it. On CPU the splits
    are already host tensors; they still must become numpy arrays (as the CUDA path makes
    them), because `all_to_all` takes the split sizes as Python sequences."""
    from megatron.core.transformer.moe import token_dispatcher as td

    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NullStream()

    def dtoh_and_synchronize(self: Any, point: str,
                             tokens_per_expert: torch.Tensor | None = None) -> Any:
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            def as_numpy(t: Any) -> Any:
                return t.numpy() if torch.is_tensor(t) else t
            self.input_splits = as_numpy(self.input_splits)
            self.output_splits = as_numpy(self.output_splits)
            self.output_splits_tp = as_numpy(self.output_splits_tp)
        return tokens_per_expert

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh_and_synchronize


# --- 3. torch.cuda.current_device(), synchronize() and streams ---------------------------------
def _cuda_device_queries_to_cpu() -> None:
    """`torch.cuda.current_device()` is the device argument of RoPE's `inv_freq.to(...)`
    (rotary_pos_embedding.py), of `GlobalMemoryBuffer.get_tensor` (core attention), of the DDP
    grad buffers (param_and_grad_buffer.py) and of the pipeline's p2p shape tensors;
    `torch.cuda.synchronize()` ends each batched p2p exchange (p2p_communication.py) and each
    async dist-checkpoint write (filesystem_async.py); `torch.cuda.current_stream()` /
    `torch.cuda.stream()` order gradient buckets in DDP. Answer them for the CPU."""
    torch.cuda.current_device = lambda: _STANDIN  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]


# --- 4. device="cuda" literals, .cuda() and tensor.type() checks ------------------------------
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


_TENSOR_TYPE_ON_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites what megatron's optimizer stack hard-codes for CUDA:
    `torch.tensor(..., device='cuda')` in FP32Optimizer/MixedPrecisionOptimizer/grad scaler,
    clip_grads (`get_grad_norm_fp32`) and the schedules' token counter; `.cuda()` in the
    distributed optimizer's state handling; and `param.type() == 'torch.cuda.FloatTensor'`
    in DistributedOptimizer/Float16Optimizer's parameter-group checks, which reject CPU
    tensors. Tensors stay on the CPU; only the device literal and the type string change."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _TENSOR_TYPE_ON_CUDA.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _STANDIN}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _STANDIN, *args[2:])
        return func(*args, **kwargs)


_MODE: _CudaLiteralsToCpu | None = None


# --- 6. the causal mask of the local attention, built again during recomputation --------------
def _causal_mask_on_cpu() -> None:
    """`get_default_causal_mask` (transformer/utils.py, called by FusedScaleMaskSoftmax) creates
    its mask with `device="cuda"`. Fix 4 rewrites that in the forward pass, but activation
    recomputation re-runs the forward inside autograd's backward, where the device-literal
    mode is not active (a mode is switched off while its own handler, here the one around
    `backward`, runs). Build the mask on the CPU (cached per length, as megatron does).
    Reached where model/attention.py falls back to megatron's own attention (an explicit
    mask, a window, dropout: its SDPA path builds no mask)."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=32)
    def causal_mask(sq: int, device: str = "cpu") -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=device), diagonal=1).bool()

    def standin_causal_mask(sq: int) -> torch.Tensor:
        return causal_mask(sq, _STANDIN)

    utils.get_default_causal_mask = standin_causal_mask
    fused_softmax.get_default_causal_mask = standin_causal_mask


def _cuda_literals_to_cpu() -> None:
    global _MODE
    _MODE = _CudaLiteralsToCpu()
    # Entered for the life of the process: megatron creates such tensors at construction,
    # in every forward_backward (token counter) and every optimizer step (grad norm).
    _MODE.__enter__()


# --- 5. torch.compile'd helpers (megatron.core.jit.jit_fuser) ---------------------------------
def _no_compile_on_cpu() -> None:
    """megatron wraps small elementwise helpers in `jit_fuser` = torch.compile, e.g.
    `TopKRouter._apply_expert_bias` (router.py, every MoE forward with expert bias) and the
    SwiGLU of the experts: on CPU each compiles for ~15 s on first call in every process, for
    no gain at the sizes that run here. Run them eagerly."""
    import torch._dynamo

    torch._dynamo.config.disable = True


# --- not CPU-specific: megatron-core 0.16.1 without Transformer Engine -------------------------
def _router_gemm_without_te() -> None:
    """`RouterGatingLinearFunction.forward` (moe_utils.py) tests `te_general_gemm is not None`,
    a name bound only when Transformer Engine imports: NameError on every MoE forward without
    TE in 0.16.1. Binding it to None selects the plain torch.mm path, as intended upstream."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def _mla_without_te() -> None:
    """`MLASelfAttention.__init__` (multi_latent_attention.py) decides HAVE_TE by importing
    megatron's TE extension module, which without TE still imports (its classes derive from a
    MagicMock); so HAVE_TE is True and `isinstance(self.linear_proj, TELinear)` raises
    TypeError. Tell it the truth."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


NO_TE_FIXES: dict[str, Callable[[], None]] = {
    "router_gemm_without_te": _router_gemm_without_te,
    "mla_without_te": _mla_without_te,
}
CPU_REDIRECTIONS: dict[str, Callable[[], None]] = {
    "rng_tracker_on_cpu_generator": _rng_tracker_on_cpu_generator,
    "alltoall_dispatcher_without_streams": _alltoall_dispatcher_without_streams,
    "cuda_device_queries_to_cpu": _cuda_device_queries_to_cpu,
    "cuda_literals_to_cpu": _cuda_literals_to_cpu,
    "no_compile_on_cpu": _no_compile_on_cpu,
    "causal_mask_on_cpu": _causal_mask_on_cpu,
}


def apply(skip: frozenset[str] = frozenset()) -> list[str]:
    """Apply what this process needs, once; return the names applied so far.

    Args:
        skip: redirection names to leave out (tests use it to prove each is needed).
    """
    if _APPLIED:
        return list(_APPLIED)
    todo: dict[str, Callable[[], None]] = {}
    if not _have_transformer_engine():
        todo.update(NO_TE_FIXES)
    if not torch.cuda.is_available():
        todo.update(CPU_REDIRECTIONS)
    for name, fix in todo.items():
        if name not in skip:
            fix()
            _APPLIED.append(name)
    log.debug("megatron compatibility fixes applied: %s", ", ".join(_APPLIED))
    if not _have_transformer_engine():
        log.info("without Transformer Engine%s: megatron-core's local layers, torch norms, "
                 "torch.optim.AdamW and its own multi-tensor helpers%s", _apex_note(),
                 "" if torch.cuda.is_available() else " (CPU: no fused kernels to miss)")
    return list(_APPLIED)


def _apex_note() -> str:
    try:
        import apex  # noqa: F401
    except ImportError:
        return " and Apex"
    return ""


"""Builds the optional extension ``megatron_r1._C`` from csrc/ and nothing else.

Metadata and tool configuration live in pyproject.toml. The extension is compiled through
torch.utils.cpp_extension, so the build needs the torch that will import it
(``pip install --no-build-isolation -e .``):

- torch importable: the CPU kernels (csrc/grpo_loss_cpu.cpp + bindings) are always built;
- a CUDA toolkit (nvcc under CUDA_HOME) *and* a CUDA build of torch: the CUDA kernels
  (csrc/grpo_loss_cuda.cu) are added, for TORCH_CUDA_ARCH_LIST or by default sm_80 + sm_90a;
- torch missing, or MEGATRON_R1_NO_EXTENSION=1: no extension; the package then runs on its
  PyTorch reference (megatron_r1/ops warns once).

MEGATRON_R1_NO_CUDA=1 builds the CPU kernels only. This file never runs git, pip or the
network.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

# -g0: the interpreter's CFLAGS carry -g, which doubles compile time and the .so size.
# -fno-trapping-math: lets GCC if-convert the float selects in the CPU kernels' hot loops so
# they vectorise (nothing here reads floating-point exception flags).
_CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-Wno-unused-function"]
_NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
# Hopper gets sm_90a (clusters, distributed shared memory); sm_80 keeps A100s running on the
# one-block-per-row and streaming kernels.
_DEFAULT_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def _log(msg: str) -> None:
    print(f"megatron-r1 setup.py: {msg}", file=sys.stderr)


def _extensions() -> tuple[list, dict]:
    if os.environ.get("MEGATRON_R1_NO_EXTENSION") == "1":
        _log("MEGATRON_R1_NO_EXTENSION=1: not building megatron_r1._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable: not building megatron_r1._C (install torch first and "
             "use pip install --no-build-isolation to get the fused kernels)")
        return [], {}

    sources = ["csrc/grpo_loss_bind.cpp", "csrc/grpo_loss_cpu.cpp"]
    with_cuda = (
        os.environ.get("MEGATRON_R1_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    common = dict(
        name="megatron_r1._C",
        include_dirs=[os.path.abspath("csrc")],
        # at::parallel_for is OpenMP in torch's CPU builds; libgomp resolves to torch's own copy
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        nvcc = list(_NVCC_FLAGS)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += _DEFAULT_GENCODE
        ext = cpp_extension.CUDAExtension(
            sources=[*sources, "csrc/grpo_loss_cuda.cu"],
            define_macros=[("MEGATRON_R1_WITH_CUDA", None)],
            extra_compile_args={"cxx": _CXX_FLAGS, "nvcc": nvcc},
            **common,
        )
        _log(f"building megatron_r1._C with CPU and CUDA kernels (CUDA {torch.version.cuda})")
    else:
        ext = cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": _CXX_FLAGS}, **common
        )
        _log("building megatron_r1._C with CPU kernels only (no CUDA toolkit or CPU torch)")
    build_ext = cpp_extension.BuildExtension.with_options(
        use_ninja=shutil.which("ninja") is not None
    )
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

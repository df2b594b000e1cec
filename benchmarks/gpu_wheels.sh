#!/usr/bin/env bash
# The wheels benchmarks/bench_trainer_gpu.py imports besides torch, for the lent GPU machine
# (Python 3.12, CUDA torch, no network), at the versions this checkout's .venv runs, into
# gpu_wheels/ (git-ignored; about 28 MB, under the device tool's 64 MiB carry limit).
#
#   bash benchmarks/gpu_wheels.sh
# then one device call (carry=["gpu_wheels"]):
#   python3 -m pip install -q --no-index --no-deps gpu_wheels/*.whl &&
#   python3 -m pip install -q --no-build-isolation --no-deps -e . &&
#   python3 -m pytest -q tests/gpu tests/ops &&
#   python3 benchmarks/bench_trainer_gpu.py --config tiny &&
#   python3 benchmarks/bench_trainer_gpu.py --config mid
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
PACKAGES="megatron-core einops transformers tokenizers huggingface_hub hf-xet safetensors regex
          zarr numcodecs donfig google-crc32c psutil pyyaml tqdm"
pinned=()
for name in $PACKAGES; do
    version=$($PIP show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    pinned+=("$name${version:+==$version}")
done
rm -rf gpu_wheels && mkdir gpu_wheels
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d gpu_wheels "${pinned[@]}"
du -sh gpu_wheels

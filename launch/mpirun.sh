#!/bin/bash
# megatron-r1 under mpirun, for clusters without SLURM: each MPI rank finds its rank through
# mpi4py, and rank 0 broadcasts its host and a free port (megatron_r1/parallel/launch_env.py).
#
#   launch/mpirun.sh [MPIRUN OPTIONS...] -- [COMMAND] CONFIG.yaml [--set section.key=value ...]
#   launch/mpirun.sh -n 16 -hosts node1,node2 -ppn 8 -- train configs/run.yaml     (MPICH)
#   launch/mpirun.sh -n 16 -H node1:8,node2:8 -- train configs/run.yaml            (Open MPI)
#
# Without `--`, every argument is megatron-r1's and mpirun gets `-n ${NPROCS:-1}`.
# MPIRUN picks the mpirun (default: the one on PATH, e.g. the `mpich` wheel's in a venv).
# Resume: run the same command again; the run resumes from its latest checkpoint in
# logging.run_dir (or MR1_RUN_DIR). Exit code: mpirun's (the ranks' worst: 2 bad input).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

mpi_opts=()
if [[ " $* " == *" -- "* ]]; then
    while [[ $# -gt 0 && "$1" != "--" ]]; do mpi_opts+=("$1"); shift; done
    shift
else
    mpi_opts=(-n "${NPROCS:-1}")
fi
mr1_parse_args "$@" || exit $?
mr1_default_env

mpirun_bin=${MPIRUN:-mpirun}
if ! command -v "$mpirun_bin" >/dev/null 2>&1; then
    echo "megatron-r1 launch: $mpirun_bin not found (pip install mpich, or set MPIRUN)" >&2
    exit 2
fi
version=$("$mpirun_bin" --version 2>&1 || true)
if [[ "$version" == *"Open MPI"* || "$version" == *"OpenRTE"* ]]; then
    # Tag each line with its rank; forward the environment the ranks need to other nodes.
    mpi_opts+=(--tag-output -x PATH -x PYTHONPATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS
               -x CUDA_DEVICE_MAX_CONNECTIONS -x TORCH_NCCL_ASYNC_ERROR_HANDLING
               -x TORCH_NCCL_AVOID_RECORD_STREAMS -x NCCL_DEBUG)
    [[ $(id -u) -eq 0 ]] && mpi_opts+=(--allow-run-as-root)
else
    # MPICH (Hydra) forwards the whole environment; -prepend-rank tags each line.
    mpi_opts+=(-prepend-rank)
fi

echo "megatron-r1 mpirun: $(date -Is)"
echo "  command: $mpirun_bin ${mpi_opts[*]} ${MR1_CMD[*]}"
mr1_print_env
if [[ -n "${MR1_RUN_DIR:-}" ]]; then
    # Keep a log per launch next to the run's outputs.
    mkdir -p "$MR1_RUN_DIR/logs"
    log="$MR1_RUN_DIR/logs/mpirun-$(date +%Y%m%dT%H%M%S).log"
    echo "  log:     $log"
    "$mpirun_bin" "${mpi_opts[@]}" "${MR1_CMD[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
else
    "$mpirun_bin" "${mpi_opts[@]}" "${MR1_CMD[@]}"
    rc=$?
fi
echo "megatron-r1 mpirun: exit code $rc ($(date -Is))"
exit "$rc"

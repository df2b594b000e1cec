#!/bin/bash
# megatron-r1 under torchrun, for one machine or clusters without SLURM/MPI.
#
#   launch/torchrun.sh [COMMAND] CONFIG.yaml [--set section.key=value ...]
#
# One node: NPROC_PER_NODE ranks (default: the GPUs torch sees, or 1), `--standalone`.
# Several nodes: run it on every node with NNODES, NODE_RANK, MASTER_ADDR (rank 0's host) and
# MASTER_PORT (default 29500) set; torchrun's c10d rendezvous joins them (RDZV_ID names the
# job, default megatron-r1). Resume: run the same command again (latest checkpoint of
# logging.run_dir or MR1_RUN_DIR). Exit code: torchrun's (2 bad input).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

# torchrun starts the Python processes itself (`python -m megatron_r1`): MR1_LAUNCHER is
# not used here; PYTHON picks the interpreter.
mr1_parse_args "$@" || exit $?
mr1_default_env
python_bin=${PYTHON:-python}
nproc=${NPROC_PER_NODE:-$("$python_bin" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
nnodes=${NNODES:-1}

if [[ "$nnodes" -eq 1 ]]; then
    rdzv=(--standalone)
else
    : "${MASTER_ADDR:?set MASTER_ADDR to the first node for a multi-node run}"
    : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node}"
    rdzv=(--nnodes="$nnodes" --node-rank="$NODE_RANK" --rdzv-backend=c10d
          --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-megatron-r1}")
fi
echo "megatron-r1 torchrun: $(date -Is)"
echo "  command: $python_bin -m torch.distributed.run ${rdzv[*]} --nproc-per-node=$nproc" \
     "-m megatron_r1 ${MR1_ARGS[*]}"
mr1_print_env
"$python_bin" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node="$nproc" \
    -m megatron_r1 "${MR1_ARGS[@]}"
rc=$?
echo "megatron-r1 torchrun: exit code $rc ($(date -Is))"
exit "$rc"

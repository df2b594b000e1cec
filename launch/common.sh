# Shared by launch/slurm/train.sbatch, launch/mpirun.sh and launch/torchrun.sh (sourced).
#
# mr1_parse_args [COMMAND] [CONFIG.yaml] [ARGS...]
#   COMMAND: a megatron-r1 sub-command (train, sft, eval, sample, convert, plan); default train.
#   CONFIG:  a .yaml/.yml path becomes `--config CONFIG`; everything after passes through
#            verbatim (`--set section.key=value ...`). No hyper-parameter is set here.
# Sets MR1_ARGS (array: the sub-command and its arguments) and MR1_CMD (array: the launcher
# followed by MR1_ARGS, the full command line of one rank).
# Environment: MR1_LAUNCHER (the program; default `megatron-r1` when on PATH, else
# `python -m megatron_r1`), MR1_RUN_DIR (when set: `--set logging.run_dir=...` is added for
# commands that take a config, before the caller's own --set, which win).

mr1_parse_args() {
    local command=train
    if [[ $# -gt 0 && "$1" != -* && "$1" != *.yaml && "$1" != *.yml ]]; then
        command=$1
        shift
    fi
    local launcher
    if [[ -n "${MR1_LAUNCHER:-}" ]]; then
        read -r -a launcher <<< "$MR1_LAUNCHER"
    elif command -v megatron-r1 >/dev/null 2>&1; then
        launcher=(megatron-r1)
    else
        launcher=(python -m megatron_r1)
    fi
    MR1_ARGS=("$command")
    if [[ $# -gt 0 && ( "$1" == *.yaml || "$1" == *.yml ) ]]; then
        if [[ ! -f "$1" ]]; then
            echo "megatron-r1 launch: config file not found: $1" >&2
            return 2
        fi
        MR1_ARGS+=(--config "$1")
        shift
    fi
    case "$command" in
        train|sft|eval|sample)
            if [[ -n "${MR1_RUN_DIR:-}" ]]; then
                MR1_ARGS+=(--set "logging.run_dir=$MR1_RUN_DIR")
            fi ;;
    esac
    MR1_ARGS+=("$@")
    MR1_CMD=("${launcher[@]}" "${MR1_ARGS[@]}")
}

# Safe defaults for the communication libraries; a value already in the environment wins.
mr1_default_env() {
    export PYTHONUNBUFFERED=1
    # One thread per rank unless the allocation gives each task more cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # megatron-core's TP/SP communication overlap relies on a single CUDA work queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # NCCL errors surface as exceptions (the job ends) instead of hanging ranks.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Free communication buffers at once instead of caching them per stream (less memory).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Site-specific, left to the user (see launch/README.md): NCCL_SOCKET_IFNAME,
    # GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_IB_TIMEOUT, NCCL_NET_GDR_LEVEL.
}

mr1_print_env() {
    env | grep -E '^(MASTER_ADDR|MASTER_PORT|OMP_NUM_THREADS|CUDA_|TORCH_NCCL_|NCCL_|GLOO_|MR1_)' \
        | sort | sed 's/^/  /'
}

# shellcheck shell=bash
# Launch logic shared by the training launchers in scripts/ (sourced, not run).
# A launcher sets its variables, then calls:   launch SCRIPT.py [ARGS...]
#
#   TOT_CUDA        GPUs to use, e.g. "0" or "0,1,2,3": one → python, several → torchrun with one
#                   process per GPU. "" = leave CUDA_VISIBLE_DEVICES alone (CPU machines).
#   NPROC_PER_NODE  processes per node (default: the number of GPUs in TOT_CUDA; on a CPU
#                   machine e.g. TOT_CUDA="" NPROC_PER_NODE=2 runs two gloo processes)
#   PORT            rendezvous port of torchrun (MASTER_PORT overrides it; default 12345)
#   NNODES          machines (default 1). For NNODES>1 run the same launcher on every machine
#                   with its NODE_RANK (0..NNODES-1) and the same MASTER_ADDR (node 0's address).
#   DS_CONFIG       DeepSpeed config (config-sample/ds_zero*.json) → --deepspeed FILE; runs under
#                   torchrun even on one GPU (ZeRO needs a process group)
#   DRY_RUN=1       print the command instead of running it
#   PYTHON          interpreter for single-process runs (default python)
# Arguments given to a launcher are appended, and win over its defaults:
#   bash scripts/finetune.sh --num_epochs 1 --learning_rate 1e-4

# Paths in the launchers (sample/, config-sample/, finetune.py) are relative to the repository.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

die() {
    echo "error: $*" >&2
    exit 2
}

is_count() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# The command for SCRIPT.py ARGS... in the array LAUNCH_CMD (without the environment).
build_launch_command() {
    local script=$1
    shift
    local gpus=()
    if [ -n "${TOT_CUDA:-}" ]; then
        IFS=, read -r -a gpus <<<"$TOT_CUDA"
    fi
    local nproc=${NPROC_PER_NODE:-${#gpus[@]}}
    if [ "$nproc" = 0 ]; then nproc=1; fi
    local nnodes=${NNODES:-1}
    local port=${MASTER_PORT:-${PORT:-12345}}
    is_count "$nproc" || die "NPROC_PER_NODE=$nproc: give a number of processes, e.g. 2"
    is_count "$nnodes" || die "NNODES=$nnodes: give a number of machines, e.g. 2"
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT=$port: give a port number, e.g. 12345"

    if [ "$nproc" = 1 ] && [ "$nnodes" = 1 ] && [ -z "${DS_CONFIG:-}" ]; then
        LAUNCH_CMD=("${PYTHON:-python}" "$script")
    else
        LAUNCH_CMD=(torchrun --nproc_per_node="$nproc")
        if [ "$nnodes" != 1 ]; then
            [ -n "${NODE_RANK:-}" ] || die "NNODES=$nnodes: set NODE_RANK (0 on the first machine, 1, 2, ... on the others)"
            [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$nnodes: set MASTER_ADDR to the address of the machine with NODE_RANK=0"
            if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$nnodes" ]; then
                die "NODE_RANK=$NODE_RANK: must be 0..$((nnodes - 1)) for NNODES=$nnodes"
            fi
            LAUNCH_CMD+=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR")
        fi
        LAUNCH_CMD+=(--master_port="$port" "$script")
    fi
    LAUNCH_CMD+=("$@")
    if [ -n "${DS_CONFIG:-}" ]; then
        [ -f "$DS_CONFIG" ] || [ -n "${DRY_RUN:-}" ] || die "DS_CONFIG=$DS_CONFIG: file not found (see config-sample/ds_zero*.json)"
        LAUNCH_CMD+=(--deepspeed "$DS_CONFIG")
    fi
}

# Run SCRIPT.py ARGS... on the GPUs in TOT_CUDA (or print the command with DRY_RUN=1).
launch() {
    build_launch_command "$@"
    if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then
        local line
        line=$(printf '%q ' "${LAUNCH_CMD[@]}")
        if [ -n "${TOT_CUDA:-}" ]; then line="CUDA_VISIBLE_DEVICES=$TOT_CUDA $line"; fi
        echo "${line% }"
        exit 0
    fi
    if [ -n "${TOT_CUDA:-}" ]; then export CUDA_VISIBLE_DEVICES=$TOT_CUDA; fi
    exec "${LAUNCH_CMD[@]}"
}

# What a continue launcher passes for LORA_PATH, in the array CONTINUE_ARGS:
#   a checkpoint-N/ folder (it has trainer_state.json) → --resume_from_checkpoint: adapter,
#     optimizer, LR schedule, step and data position; from_data_beginning=true restarts the
#     data instead of skipping what the checkpoint had seen (--ignore_data_skip);
#   any other adapter folder or a hub id → --lora_weights: its weights, a fresh optimizer.
# shellcheck disable=SC2034  # CONTINUE_ARGS is read by the launcher that sources this file
continue_arguments() {
    local lora_path=$1 from_beginning
    from_beginning=$(echo "$2" | tr '[:upper:]' '[:lower:]')
    [ -n "$lora_path" ] || die "set LORA_PATH to a checkpoint-N folder, an adapter folder or a hub id"
    case "$from_beginning" in
    true | false) ;;
    *) die "from_data_beginning=$2: use true or false" ;;
    esac
    if [ -f "$lora_path/trainer_state.json" ]; then
        CONTINUE_ARGS=(--resume_from_checkpoint "$lora_path" --ignore_data_skip "$from_beginning")
    elif [ -d "$lora_path" ] || [[ ! "$lora_path" =~ ^[./~] ]]; then
        CONTINUE_ARGS=(--lora_weights "$lora_path")
    else
        die "LORA_PATH=$lora_path: folder not found (give a checkpoint-N folder, an adapter folder or a hub id)"
    fi
}

# The flags every training launcher passes, from its variables, in the array TRAIN_ARGS.
# shellcheck disable=SC2034  # TRAIN_ARGS is read by the launcher that sources this file
training_arguments() {
    TRAIN_ARGS=(--base_model "$MODEL_PATH" --data_path "$DATA_PATH" --output_dir "$OUTPUT_PATH")
    if [ -n "${PRECISION:-}" ]; then TRAIN_ARGS+=(--precision "$PRECISION"); fi
    TRAIN_ARGS+=(--val_set_size "$TEST_SIZE" --eval_steps "$SAVE_STEPS" --save_steps "$SAVE_STEPS")
}

#!/usr/bin/env bash
# Continue instruction fine-tuning from a checkpoint or an adapter (Chinese-Vicuna's
# finetune_continue.sh), base model in 8-bit.
#   LORA_PATH            what to continue from (Chinese-Vicuna's lora_checkpoint and
#                        lora_remote_checkpoint are read too):
#                          a checkpoint-N/ folder → resumes adapter, optimizer, schedule and step;
#                          an adapter folder or hub id → starts from its weights, fresh optimizer
#   from_data_beginning  true: on resume, start the data from the beginning instead of skipping
#                        what the checkpoint had seen (e.g. new data); default false
#   MODEL_PATH, DATA_PATH, OUTPUT_PATH, TEST_SIZE, PRECISION: as in scripts/finetune.sh
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/instruct/data_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-output}
LORA_PATH=${LORA_PATH:-${lora_checkpoint:-${lora_remote_checkpoint:-Chinese-Vicuna/Chinese-Vicuna-lora-7b-belle-and-guanaco}}}
from_data_beginning=${from_data_beginning:-false}
TEST_SIZE=${TEST_SIZE:-1}
PRECISION=${PRECISION:-8bit}
SAVE_STEPS=${SAVE_STEPS:-200}

continue_arguments "$LORA_PATH" "$from_data_beginning"
training_arguments
launch finetune.py "${TRAIN_ARGS[@]}" \
    "${CONTINUE_ARGS[@]}" \
    "$@"

#!/usr/bin/env bash
# QLoRA: instruction fine-tuning with the base model in 4-bit NF4 (double quantization, bf16
# compute where the GPU has it) and a paged 8-bit AdamW (Chinese-Vicuna's finetune_4bit.sh:
# 7B in about 6 GB, 13B on an 11 GB 2080Ti).
#   MODEL_PATH, DATA_PATH, OUTPUT_PATH, TEST_SIZE: as in scripts/finetune.sh
#   OPTIM        optimizer (default paged_adamw_8bit; adamw_torch for the plain one)
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/instruct/data_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-4bit}
TEST_SIZE=${TEST_SIZE:-1}
OPTIM=${OPTIM:-paged_adamw_8bit}
SAVE_STEPS=${SAVE_STEPS:-200}
PRECISION=4bit

training_arguments
launch finetune.py "${TRAIN_ARGS[@]}" --optim "$OPTIM" "$@"

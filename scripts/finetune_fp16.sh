#!/usr/bin/env bash
# Instruction fine-tuning with half-precision base weights (bf16 where the GPU has it, fp16 on
# older cards) and DeepSpeed ZeRO-2 with the optimizer offloaded to CPU RAM: for GPUs where
# 8-bit misbehaves (Chinese-Vicuna's finetune_fp16.sh). The LoRA weights stay fp32.
#   MODEL_PATH, DATA_PATH, OUTPUT_PATH, TEST_SIZE: as in scripts/finetune.sh
#   DS_CONFIG    DeepSpeed config (default config-sample/ds_zero2_offload.json; "" = no DeepSpeed)
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-11451}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/instruct/data_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-fp16}
TEST_SIZE=${TEST_SIZE:-1}
PRECISION=${PRECISION:-half}
DS_CONFIG=${DS_CONFIG-config-sample/ds_zero2_offload.json}
SAVE_STEPS=${SAVE_STEPS:-200}

training_arguments
launch finetune.py "${TRAIN_ARGS[@]}" "$@"

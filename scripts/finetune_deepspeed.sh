#!/usr/bin/env bash
# Instruction fine-tuning under DeepSpeed ZeRO (Chinese-Vicuna's finetune_deepspeed.sh), always
# through torchrun; ZeRO-3 splits the base weights over the GPUs, for models one GPU cannot hold.
#   DS_CONFIG    config-sample/ds_zero3.json (default), ds_zero3_offload.json (parameters and
#                optimizer in CPU RAM), ds_zero2.json, ds_zero2_offload.json
#   PRECISION    half (default: bf16, or fp16 on older GPUs) | fp32 | bf16 | fp16
#                (8-bit and 4-bit weights cannot be partitioned: use ZeRO-2 with those)
#   MODEL_PATH, DATA_PATH, OUTPUT_PATH, TEST_SIZE: as in scripts/finetune.sh
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0,1,2,3}
PORT=${PORT:-11451}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/instruct/data_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-deepspeed}
TEST_SIZE=${TEST_SIZE:-1}
PRECISION=${PRECISION:-half}
DS_CONFIG=${DS_CONFIG:-config-sample/ds_zero3.json}
SAVE_STEPS=${SAVE_STEPS:-200}

training_arguments
launch finetune.py "${TRAIN_ARGS[@]}" "$@"

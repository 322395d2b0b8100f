#!/usr/bin/env bash
# Instruction LoRA fine-tuning with the base model in 8-bit (Chinese-Vicuna's finetune.sh):
# python on one GPU, torchrun with one process per GPU when TOT_CUDA lists several.
#   MODEL_PATH   base model folder or hub id (LLaMA-family, Hugging Face format)
#   DATA_PATH    alpaca-format .json / .jsonl (instruction, input, output)
#   OUTPUT_PATH  adapter folder (checkpoint-N/ inside every SAVE_STEPS steps)
#   TEST_SIZE    samples held out for the eval loss
#   PRECISION    8bit (default) | 4bit | half (bf16, or fp16 on older GPUs) | fp32 | bf16 | fp16
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
# Extra arguments go to finetune.py and win over these, e.g. --num_epochs 1 --batch_size 64
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/instruct/data_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna}
TEST_SIZE=${TEST_SIZE:-1}
PRECISION=${PRECISION:-8bit}
SAVE_STEPS=${SAVE_STEPS:-200}

training_arguments
launch finetune.py "${TRAIN_ARGS[@]}" "$@"

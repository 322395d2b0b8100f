#!/usr/bin/env bash
# Multi-turn chat fine-tuning, loss on the assistant turns (Chinese-Vicuna's finetune_chat.sh):
# micro-batch 4, global batch 128, conversations up to 2048 tokens, base model in 8-bit.
#   MODEL_PATH   base model folder or hub id
#   DATA_PATH    chat data: Chinese-Vicuna chat, ShareGPT, OpenAI messages (.json / .jsonl)
#   OUTPUT_PATH  adapter folder
#   TEMPLATE     chat template (default chinese-vicuna-chat; vicuna_v1.1, chatml, llama2, llama3, auto)
#   TEST_SIZE    conversations held out for the eval loss (default 0)
#   PRECISION    8bit (default) | 4bit | half | fp32 | bf16 | fp16
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/chat/chat_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-chat}
TEMPLATE=${TEMPLATE:-chinese-vicuna-chat}
TEST_SIZE=${TEST_SIZE:-0}
PRECISION=${PRECISION:-8bit}
SAVE_STEPS=${SAVE_STEPS:-200}

training_arguments
launch finetune_chat.py "${TRAIN_ARGS[@]}" \
    --prompt_template "$TEMPLATE" \
    --micro_batch_size 4 \
    --batch_size 128 \
    --warmup_steps 0.05 \
    --logging_steps 100 \
    "$@"

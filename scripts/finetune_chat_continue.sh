#!/usr/bin/env bash
# Continue chat fine-tuning from a checkpoint or an adapter (Chinese-Vicuna's
# finetune_chat_continue.sh: e.g. a domain's conversations on top of a chat LoRA).
#   LORA_PATH            a checkpoint-N/ folder (resumes optimizer, schedule and step) or an
#                        adapter folder / hub id (its weights, fresh optimizer); Chinese-Vicuna's
#                        lora_checkpoint and lora_remote_checkpoint are read too
#   from_data_beginning  true (default here, as in Chinese-Vicuna): on resume, start the data
#                        from the beginning instead of skipping what the checkpoint had seen
#   MODEL_PATH, DATA_PATH, OUTPUT_PATH, TEMPLATE, TEST_SIZE, PRECISION: as in finetune_chat.sh
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
DATA_PATH=${DATA_PATH:-sample/chat/chat_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-chat-continue}
LORA_PATH=${LORA_PATH:-${lora_checkpoint:-${lora_remote_checkpoint:-Chinese-Vicuna/Chinese-Vicuna-lora-7b-chatv1}}}
from_data_beginning=${from_data_beginning:-true}
TEMPLATE=${TEMPLATE:-chinese-vicuna-chat}
TEST_SIZE=${TEST_SIZE:-0}
PRECISION=${PRECISION:-8bit}
SAVE_STEPS=${SAVE_STEPS:-200}

continue_arguments "$LORA_PATH" "$from_data_beginning"
training_arguments
launch finetune_chat.py "${TRAIN_ARGS[@]}" \
    --prompt_template "$TEMPLATE" \
    --micro_batch_size 6 \
    --batch_size 32 \
    --warmup_steps 0.01 \
    --logging_steps 100 \
    "${CONTINUE_ARGS[@]}" \
    "$@"

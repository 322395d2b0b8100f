#!/usr/bin/env bash
# Multi-turn chat page with streaming answers (chat.py), on http://127.0.0.1:$PORT.
#   BASE_MODEL   base model folder or hub id (a merged model works without LORA_PATH)
#   LORA_PATH    adapter folder (output_dir or checkpoint-N), stock PEFT adapter or hub id; "" = none
#   TOT_CUDA     GPUs to use, e.g. "0" or "0,1" (several: layers spread with --device_map auto)
#   PORT         page port (default 7860)
#   PRECISION    auto (8bit on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | 8bit | 4bit
#   TEMPLATE     chat template (default chinese-vicuna-chat)
# Extra arguments go to chat.py, e.g. --cli (chat in the terminal), --max_memory 1024, --system "...".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BASE_MODEL=${BASE_MODEL:?set BASE_MODEL to a base model folder or hub id}
LORA_PATH=${LORA_PATH-}
TOT_CUDA=${TOT_CUDA:-0}
PORT=${PORT:-7860}
PRECISION=${PRECISION:-auto}
TEMPLATE=${TEMPLATE:-chinese-vicuna-chat}

args=(--base_model "$BASE_MODEL" --prompt_template "$TEMPLATE" --precision "$PRECISION" --server_port "$PORT")
if [ -n "$LORA_PATH" ]; then args+=(--lora_weights "$LORA_PATH"); fi
if [[ "$TOT_CUDA" == *,* ]]; then args+=(--device_map auto); fi
CUDA_VISIBLE_DEVICES=$TOT_CUDA exec python chat.py "${args[@]}" "$@"

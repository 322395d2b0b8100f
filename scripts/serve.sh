#!/usr/bin/env bash
# OpenAI-compatible API over one base model and several LoRAs (serve.py), on http://127.0.0.1:$PORT/v1.
#   BASE_MODEL   base model folder or hub id (a merged model works without LORA_PATH)
#   LORA_PATH    LoRAs to serve, space-separated NAME=DIR pairs, e.g. "medical=./lora-med chat=./lora-chat"; "" = none
#   TOT_CUDA     GPUs to use, e.g. "0" or "0,1" (several: layers spread with --device_map auto;
#                with ENGINE=vllm: tensor parallel over them)
#   PORT         API port (default 8000)
#   PRECISION    auto (8bit on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | 8bit | 4bit
#   TEMPLATE     prompt template of the base (and of LoRAs saved without one; default alpaca)
#   ENGINE       builtin (default) | vllm | llamacpp (then GGUF=FILE)
#   CHINESE_VICUNA_API_KEY   if set, every request must send it (Authorization: Bearer ...)
# Extra arguments go to serve.py, e.g. --max_loras 8 --host 0.0.0.0 --max_batch_size 32.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BASE_MODEL=${BASE_MODEL-}
LORA_PATH=${LORA_PATH-}
TOT_CUDA=${TOT_CUDA:-0}
PORT=${PORT:-8000}
PRECISION=${PRECISION:-auto}
TEMPLATE=${TEMPLATE:-alpaca}
ENGINE=${ENGINE:-builtin}
GGUF=${GGUF-}

args=(--engine "$ENGINE" --prompt_template "$TEMPLATE" --port "$PORT")
if [ "$ENGINE" = llamacpp ]; then
    args+=(--gguf "${GGUF:?set GGUF to a .gguf file (tools/convert_to_gguf.py)}")
else
    args+=(--base_model "${BASE_MODEL:?set BASE_MODEL to a base model folder or hub id}" --precision "$PRECISION")
fi
if [ -n "$LORA_PATH" ]; then
    read -r -a modules <<<"$LORA_PATH"
    args+=(--lora_modules "${modules[@]}")
fi
if [[ "$TOT_CUDA" == *,* && "$ENGINE" = builtin ]]; then args+=(--device_map auto); fi
export TOT_CUDA
CUDA_VISIBLE_DEVICES=$TOT_CUDA exec python serve.py "${args[@]}" "$@"

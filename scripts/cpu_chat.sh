#!/usr/bin/env bash
# Chat on the CPU with a GGUF file through llama.cpp (needs: bash scripts/setup_env.sh --llamacpp).
#   GGUF_PATH=merged-q4_0.gguf PROMPT_TEMPLATE=chinese-vicuna-chat bash scripts/cpu_chat.sh
# Make the GGUF file first:
#   python merge_lora.py --base_model BASE --lora_weights LORA --output_dir merged
#   python tools/convert_to_gguf.py --model_dir merged --outfile merged-q4_0.gguf --outtype q4_0
# Extra arguments go to tools/cpu_chat.py (e.g. --do_sample true --temperature 0.7 --max_new_tokens 512).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GGUF_PATH=${GGUF_PATH:-merged-q4_0.gguf}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-chinese-vicuna-chat}
THREADS=${THREADS:-$(nproc)}
N_CTX=${N_CTX:-2048}

if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
exec python tools/cpu_chat.py --gguf "$GGUF_PATH" --prompt_template "$PROMPT_TEMPLATE" --threads "$THREADS" --n_ctx "$N_CTX" "$@"

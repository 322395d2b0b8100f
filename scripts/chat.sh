#!/usr/bin/env bash
# Multi-turn chat page with streaming answers (chat.py), on http://127.0.0.1:$PORT.
#   BASE_MODEL, LORA_PATH, TOT_CUDA, PORT, PRECISION: see scripts/lib/infer.sh
#   TEMPLATE     chat template (default chinese-vicuna-chat)
# Extra arguments go to chat.py, e.g. --cli (chat in the terminal), --max_memory 1024, --system "...".
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/infer.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/infer.sh"
TEMPLATE=${TEMPLATE:-chinese-vicuna-chat}
run_inference chat.py "$@"

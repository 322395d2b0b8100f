#!/usr/bin/env bash
# The training board (board.py) on http://127.0.0.1:$PORT: configure, run and watch a fine-tune,
# chat with the result, export it. The page runs finetune.py / finetune_chat.py / tools/pretrain.py
# with the very command line it shows.
#   BASE_MODEL   base model folder the page starts with (optional; editable in the page)
#   RUNS_DIR     where runs are kept (default board-runs)
#   PORT         page port (default 7860)
#   TOT_CUDA     GPUs the runs see, e.g. "0" (default 0)
# Extra arguments go to board.py, e.g. --ui_language en, --auth user:password, --share true.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
args=(--runs_dir "${RUNS_DIR:-board-runs}" --server_port "${PORT:-7860}")
if [ -n "${BASE_MODEL-}" ]; then args+=(--base_model "$BASE_MODEL"); fi
CUDA_VISIBLE_DEVICES=${TOT_CUDA:-0} exec python board.py "${args[@]}" "$@"

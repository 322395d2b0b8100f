#!/usr/bin/env bash
# Instruction Q&A page with a streaming answer (generate.py), on http://127.0.0.1:$PORT.
#   BASE_MODEL, LORA_PATH, TOT_CUDA, PORT, PRECISION: see scripts/lib/infer.sh
#   TEMPLATE     prompt template the LoRA was trained with (default alpaca)
# Extra arguments go to generate.py, e.g. --data_file in.jsonl --output_file out.jsonl (batch mode).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/infer.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/infer.sh"
TEMPLATE=${TEMPLATE:-alpaca}
run_inference generate.py "$@"

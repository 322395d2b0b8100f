#!/usr/bin/env bash
# Continued pretraining on plain text with an expanded vocabulary (tools/pretrain.py):
#   STAGE=embeddings  train only embed_tokens and lm_head → a full model folder
#   STAGE=lora        LoRA + embed_tokens and lm_head trained in full → an adapter (default)
#   MODEL_PATH      base model folder or hub id (for STAGE=lora, e.g. the embeddings stage's output)
#   TOKENIZER_PATH  the expanded tokenizer (tools/merge_tokenizers.py); "" = the base model's
#   DATA_PATH       a folder of UTF-8 .txt files (or one .txt file)
#   OUTPUT_PATH     output folder
#   BLOCK_SIZE      tokens per training block (default 512)
#   TEST_SIZE       blocks held out for perplexity (default 20)
#   PRECISION       "" = tools/pretrain.py's default; fp32 | bf16 | half | 8bit | 4bit (lora stage)
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
TOKENIZER_PATH=${TOKENIZER_PATH-}
DATA_PATH=${DATA_PATH:-sample/pretrain}
STAGE=${STAGE:-lora}
OUTPUT_PATH=${OUTPUT_PATH:-pt-$STAGE}
BLOCK_SIZE=${BLOCK_SIZE:-512}
TEST_SIZE=${TEST_SIZE:-20}
PRECISION=${PRECISION-}
SAVE_STEPS=${SAVE_STEPS:-200}

args=(--base_model "$MODEL_PATH" --dataset_dir "$DATA_PATH" --output_dir "$OUTPUT_PATH"
    --stage "$STAGE" --block_size "$BLOCK_SIZE" --val_set_size "$TEST_SIZE" --save_steps "$SAVE_STEPS")
if [ -n "$TOKENIZER_PATH" ]; then args+=(--tokenizer_path "$TOKENIZER_PATH"); fi
if [ -n "$PRECISION" ]; then args+=(--precision "$PRECISION"); fi
launch tools/pretrain.py "${args[@]}" "$@"

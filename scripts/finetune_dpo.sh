#!/usr/bin/env bash
# Preference training (DPO and its variants) of a LoRA, by default continuing an SFT adapter,
# with the base model in 8-bit: python on one GPU, torchrun with one process per GPU when
# TOT_CUDA lists several (the same launch as scripts/finetune.sh).
#   MODEL_PATH   base model folder or hub id (LLaMA-family, Hugging Face format)
#   LORA_PATH    the SFT adapter to improve (also the reference); empty: a new LoRA on the base
#   DATA_PATH    preference pairs .json / .jsonl (docs/preference.md lists the formats)
#   OUTPUT_PATH  adapter folder (checkpoint-N/ inside every SAVE_STEPS steps)
#   TEST_SIZE    pairs held out for the eval loss and rewards/accuracies
#   PREF_LOSS    sigmoid (DPO, default) | ipo | hinge | orpo | simpo | kto
#   PREF_BETA    beta (default 0.1)
#   PRECISION    8bit (default) | 4bit (QLoRA, with a paged 8-bit AdamW) | half | fp32 | bf16 | fp16
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
# Extra arguments go to finetune_dpo.py and win over these, e.g. --num_epochs 1 --pref_ftx 0.1
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
LORA_PATH=${LORA_PATH-lora-Vicuna}
DATA_PATH=${DATA_PATH:-sample/preference/pairs_sample.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-dpo}
TEST_SIZE=${TEST_SIZE:-1}
PRECISION=${PRECISION:-8bit}
SAVE_STEPS=${SAVE_STEPS:-200}
PREF_LOSS=${PREF_LOSS:-sigmoid}
PREF_BETA=${PREF_BETA:-0.1}

training_arguments
TRAIN_ARGS+=(--pref_loss "$PREF_LOSS" --pref_beta "$PREF_BETA")
if [ -n "$LORA_PATH" ]; then TRAIN_ARGS+=(--lora_weights "$LORA_PATH"); fi
if [ "$PRECISION" = 4bit ]; then TRAIN_ARGS+=(--optim "${OPTIM:-paged_adamw_8bit}"); fi
launch finetune_dpo.py "${TRAIN_ARGS[@]}" "$@"

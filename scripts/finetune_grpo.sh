#!/usr/bin/env bash
# RL with verifiable rewards (GRPO, Dr. GRPO, DAPO) of a LoRA, by default continuing an SFT adapter,
# with the base model in 8-bit: python on one GPU, torchrun with one process per GPU when
# TOT_CUDA lists several (the same launch as scripts/finetune.sh).
#   MODEL_PATH     base model folder or hub id (LLaMA-family, Hugging Face format)
#   LORA_PATH      the SFT adapter to improve (also the reference); empty: a new LoRA on the base
#   DATA_PATH      prompts with their answers .json / .jsonl (docs/rl.md lists the formats)
#   OUTPUT_PATH    adapter folder (checkpoint-N/ inside every SAVE_STEPS steps, completions.jsonl)
#   REWARD_FUNCS   accuracy (default) | format | length | path/to/file.py:function, comma-separated
#   GRPO_LOSS      grpo (default) | dr_grpo | dapo
#   BETA           KL weight to the reference (default 0.04; 0: no reference)
#   NUM_GENERATIONS  completions per prompt (default 8)
#   VLLM_SERVER_URL  rollouts from this vLLM server (`vllm serve BASE --enable-lora`, docs/rl.md); empty: built-in sampler
#   PRECISION      8bit (default) | 4bit (QLoRA, with a paged 8-bit AdamW) | half | fp32 | bf16 | fp16
#   TOT_CUDA, PORT, NNODES, NODE_RANK, MASTER_ADDR, DS_CONFIG, DRY_RUN: see scripts/lib/launch.sh
# Extra arguments go to finetune_grpo.py and win over these, e.g. --max_completion_length 512
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TOT_CUDA=${TOT_CUDA-0}
PORT=${PORT:-12345}
MODEL_PATH=${MODEL_PATH:-yahma/llama-7b-hf}
LORA_PATH=${LORA_PATH-lora-Vicuna}
DATA_PATH=${DATA_PATH:-sample/rl/arithmetic.jsonl}
OUTPUT_PATH=${OUTPUT_PATH:-lora-Vicuna-grpo}
TEST_SIZE=0 # GRPO logs rewards per step instead of a held-out loss
PRECISION=${PRECISION:-8bit}
SAVE_STEPS=${SAVE_STEPS:-50}
REWARD_FUNCS=${REWARD_FUNCS:-accuracy}
GRPO_LOSS=${GRPO_LOSS:-grpo}
BETA=${BETA:-0.04}
NUM_GENERATIONS=${NUM_GENERATIONS:-8}
VLLM_SERVER_URL=${VLLM_SERVER_URL:-}

training_arguments
TRAIN_ARGS+=(--reward_funcs "$REWARD_FUNCS" --grpo_loss "$GRPO_LOSS" --beta "$BETA" --num_generations "$NUM_GENERATIONS")
if [ -n "$LORA_PATH" ]; then TRAIN_ARGS+=(--lora_weights "$LORA_PATH"); fi
if [ -n "$VLLM_SERVER_URL" ]; then TRAIN_ARGS+=(--rollout_engine vllm --vllm_server_url "$VLLM_SERVER_URL"); fi
if [ "$PRECISION" = 4bit ]; then TRAIN_ARGS+=(--optim "${OPTIM:-paged_adamw_8bit}"); fi
launch finetune_grpo.py "${TRAIN_ARGS[@]}" "$@"

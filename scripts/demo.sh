#!/usr/bin/env bash
# The built-in demo, on a fresh machine: set up .venv, build a tiny LLaMA + tokenizer from
# sample/, LoRA-fine-tune it on a dozen sample instructions, and print its answers before and
# after. About 50 s on 2 CPU cores once .venv exists (the first run installs packages first). Output goes to demo-out/ (DEMO_DIR to change).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

DEMO_DIR=${DEMO_DIR:-demo-out}
mkdir -p "$DEMO_DIR"
head -n 12 sample/instruct/data_sample.jsonl > "$DEMO_DIR/demo_data.jsonl"

echo "== 1/3 building the tiny model in $DEMO_DIR/tiny-llama"
python tools/make_tiny_model.py --output_dir "$DEMO_DIR/tiny-llama"

echo "== 2/3 fine-tuning a LoRA on $DEMO_DIR/demo_data.jsonl (12 instructions)"
rm -rf "$DEMO_DIR/lora"
python finetune.py \
    --base_model "$DEMO_DIR/tiny-llama" \
    --data_path "$DEMO_DIR/demo_data.jsonl" \
    --output_dir "$DEMO_DIR/lora" \
    --lora_r 16 --lora_alpha 32 --lora_dropout 0 --lora_target_modules all-linear \
    --learning_rate 3e-3 --warmup_steps 0 \
    --micro_batch_size 4 --batch_size 4 --num_epochs 60 \
    --val_set_size 0 --save_steps 60 --logging_steps 20 --disable_tqdm true

echo "== 3/3 answers before and after fine-tuning"
python tools/compare_answers.py \
    --base_model "$DEMO_DIR/tiny-llama" --lora_weights "$DEMO_DIR/lora" \
    --data_path "$DEMO_DIR/demo_data.jsonl" --num 6
echo "adapter: $DEMO_DIR/lora (loss curve: $DEMO_DIR/lora/training_loss.png)"

"""Instruction fine-tuning with LoRA / QLoRA on alpaca-format data → a PEFT adapter.

    python finetune.py --base_model MODEL --data_path data.jsonl --output_dir lora-Vicuna

Every TrainingArguments flag works too (`python finetune.py --help`).
"""

from __future__ import annotations

import logging

from chinese_vicuna.data import PaddingCollator, load_instruction_dataset
from chinese_vicuna.datatools.mixing import load_train_val
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.modeling import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.training import (
    BatchArguments,
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainArguments,
    build_trainer,
    load_model_for_training,
    parse_args,
    start_run,
    train_and_save,
)

logger = logging.getLogger("finetune")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, data_args, lora_args, batch_args, train_args = parse_args(
        (ModelArguments, DataArguments, LoraArguments, BatchArguments, TrainArguments), argv
    )
    resume = start_run(model_args, batch_args, train_args)

    # 1. tokenizer and data first: a bad data line fails in seconds, before a 13B model loads
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)
    template = load_template(data_args.prompt_template, tokenizer)
    with train_args.main_process_first(desc="tokenize"):
        # one file, or several mixed by --data_weights; each tokenized and cached on its own
        train_data, val_data = load_train_val(
            data_args.data_path,
            data_args.data_weights,
            data_args.val_data_path,
            data_args.val_set_size,
            train_args.seed,
            lambda path: load_instruction_dataset(
                path,
                tokenizer,
                template,
                data_args.cutoff_len,
                data_args.train_on_inputs,
                data_args.cache_dir,
                data_args.use_data_cache,
            ),
            data_args.data_mix_size,
        )

    # 2. base model (fp32 / bf16 / fp16 / 8-bit / 4-bit) and a new or continued LoRA
    model = load_model_for_training(model_args, lora_args, train_args, tokenizer)

    # 3. train and save
    trainer = build_trainer(model, tokenizer, train_args, train_data, val_data, PaddingCollator(tokenizer.pad_token_id))
    train_and_save(trainer, tokenizer, resume)


if __name__ == "__main__":
    main()

"""Instruction fine-tuning with LoRA / QLoRA on alpaca-format data → a PEFT adapter.

    python finetune.py --base_model MODEL --data_path data.jsonl --output_dir lora-Vicuna

Every TrainingArguments flag works too (`python finetune.py --help`); one .json/.yaml file of
flags works in their place. docs/architecture.md says where each step below lives.
"""

from __future__ import annotations

from typing import Any

from chinese_vicuna.args import (
    BatchArguments,
    DataArguments,
    LoraArguments,
    TemplateArguments,
    TrainArguments,
    TrainModelArguments,
    parse_args,
)
from chinese_vicuna.data.datasets import load_instruction_dataset
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.data import load_training_data
from chinese_vicuna.train.model import apply_training_speedups, load_model_for_training
from chinese_vicuna.train.packing import packed_or_padded
from chinese_vicuna.train.trainer import build_trainer, start_run, train_and_save


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # 0. flags, parsed once: precision, batch arithmetic, evaluation and resume are final here
    model_args, template_args, data_args, lora_args, _batch, train_args = parse_args(  # _batch: applied to train_args
        (TrainModelArguments, TemplateArguments, DataArguments, LoraArguments, BatchArguments, TrainArguments), argv
    )
    start_run(model_args, train_args)

    # 1. tokenizer and data first: a bad data line fails in seconds, before a 13B model loads
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)
    template = load_template(template_args.template_or_fallback, tokenizer)
    with train_args.main_process_first(desc="tokenize"):
        # one file, or several mixed by --data_weights (each tokenized and cached on its own); --val_data_path or a split
        def load(path: str) -> Any:
            return load_instruction_dataset(
                path, tokenizer, template, data_args.cutoff_len, data_args.train_on_inputs, data_args.cache_dir, data_args.use_data_cache
            )  # fmt: skip

        train_data, val_data = load_training_data(data_args, load, train_args.seed)

    # 2. base model (fp32 / bf16 / fp16 / 8-bit / 4-bit) and a new or continued LoRA
    model = load_model_for_training(model_args, lora_args, train_args, tokenizer)
    apply_training_speedups(model, lora_args, train_args)  # fast LoRA dropout, attention within packed samples (same results)

    # 3. train: packed rows unless --packing false (then padded, length-grouped batches)
    collator, trainer_class = packed_or_padded(train_args.packing, tokenizer)
    trainer = build_trainer(trainer_class, model, tokenizer, train_args, train_data, val_data, collator)
    train_and_save(trainer, tokenizer, template, train_args.resume_from_checkpoint)


if __name__ == "__main__":
    main()

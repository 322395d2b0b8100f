"""Multi-turn chat fine-tuning with LoRA / QLoRA → a PEFT adapter; loss on assistant turns only.

    python finetune_chat.py --base_model MODEL --data_path chat.jsonl --output_dir lora-Vicuna-chat

Data: Chinese-Vicuna chat (`{"input": [...], "output": [...]}`), ShareGPT, OpenAI messages, or
bare `{"role", "text"}` lists (one format per file; chinese_vicuna/data/formats.py). The same
model / LoRA / batch / training flags as finetune.py; every TrainingArguments flag works too
(`python finetune_chat.py --help`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chinese_vicuna.args import (
    BatchArguments,
    ChatTemplateArguments,
    DataArguments,
    LoraArguments,
    TrainArguments,
    TrainModelArguments,
    parse_args,
)
from chinese_vicuna.data.datasets import load_chat_dataset
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.data import load_training_data
from chinese_vicuna.train.model import apply_training_speedups, load_model_for_training
from chinese_vicuna.train.packing import packed_or_padded
from chinese_vicuna.train.trainer import build_trainer, start_run, train_and_save


@dataclass
class ChatDataArguments(DataArguments):
    data_path: str = field(
        default="sample/chat/chat_sample.jsonl",
        metadata={"help": "Chat data: .json (list) or .jsonl file, or a folder of them; format detected per file."},
    )
    cutoff_len: int = field(
        default=2048, metadata={"help": "Maximum tokens per sample; longer conversations are split at turn boundaries."}
    )
    train_on_last_turn_only: bool = field(
        default=False, metadata={"help": "Train only the last assistant turn of each sample (Chinese-Vicuna's original behaviour)."}
    )


@dataclass
class ChatTrainArguments(TrainArguments):
    output_dir: str = field(default="lora-Vicuna-chat", metadata={"help": "Where the adapter and checkpoints go."})
    # Conversations run to 2048 tokens: trade compute for activation memory by default.
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward (saves memory)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # 0. flags, parsed once: precision, batch arithmetic, evaluation and resume are final here
    model_args, template_args, data_args, lora_args, _batch, train_args = parse_args(  # _batch: applied to train_args
        (TrainModelArguments, ChatTemplateArguments, ChatDataArguments, LoraArguments, BatchArguments, ChatTrainArguments), argv
    )
    start_run(model_args, train_args)

    # 1. tokenizer and data first: a bad record fails in seconds, before a 13B model loads
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)
    template = load_template(template_args.template_or_fallback, tokenizer)
    with train_args.main_process_first(desc="tokenize"):
        # conversations → samples with labels on assistant turns only, long ones split at turn boundaries;
        # one file, or several mixed by --data_weights; --val_data_path or a split
        def load(path: str) -> Any:
            return load_chat_dataset(
                path, tokenizer, template, data_args.cutoff_len, data_args.train_on_inputs, data_args.train_on_last_turn_only, data_args.cache_dir, data_args.use_data_cache
            )  # fmt: skip

        train_data, val_data = load_training_data(data_args, load, train_args.seed)

    # 2. base model and a new or continued LoRA (gradient checkpointing on by default here)
    model = load_model_for_training(model_args, lora_args, train_args, tokenizer)
    apply_training_speedups(model, lora_args, train_args)  # fast LoRA dropout, attention within packed samples (same results)

    # 3. train on packed conversations (--packing false: padded batches)
    collator, trainer_class = packed_or_padded(train_args.packing, tokenizer)
    trainer = build_trainer(trainer_class, model, tokenizer, train_args, train_data, val_data, collator)
    train_and_save(trainer, tokenizer, template, train_args.resume_from_checkpoint)


if __name__ == "__main__":
    main()

"""Multi-turn chat fine-tuning with LoRA / QLoRA → a PEFT adapter; loss on assistant turns only.

    python finetune_chat.py --base_model MODEL --data_path chat.jsonl --output_dir lora-Vicuna-chat

Data: Chinese-Vicuna chat (`{"input": [...], "output": [...]}`), ShareGPT, OpenAI messages, or
bare `{"role", "text"}` lists (one format per file; see chinese_vicuna/chat_data.py). The same
model / LoRA / batch / training flags as finetune.py; every TrainingArguments flag works too
(`python finetune_chat.py --help`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chinese_vicuna.chat_data import load_chat_dataset
from chinese_vicuna.data import PaddingCollator
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

logger = logging.getLogger("finetune_chat")


@dataclass
class ChatDataArguments(DataArguments):
    data_path: str = field(
        default="sample/chat/chat_sample.jsonl",
        metadata={"help": "Chat data: .json (list) or .jsonl file, or a folder of them; format detected per file."},
    )
    prompt_template: str = field(
        default="chinese-vicuna-chat",
        metadata={"help": "Chat template: chinese-vicuna-chat, vicuna_v1.1, chatml, llama2, llama3, auto, or a .json path."},
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
    model_args, data_args, lora_args, batch_args, train_args = parse_args(
        (ModelArguments, ChatDataArguments, LoraArguments, BatchArguments, ChatTrainArguments), argv
    )
    resume = start_run(model_args, batch_args, train_args)

    # 1. tokenizer and data first: a bad record fails in seconds, before a 13B model loads
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
            lambda path: load_chat_dataset(  # conversations → samples with labels on assistant turns only
                path,
                tokenizer,
                template,
                data_args.cutoff_len,
                data_args.train_on_inputs,
                data_args.train_on_last_turn_only,
                data_args.cache_dir,
                data_args.use_data_cache,
            ),
            data_args.data_mix_size,
        )

    # 2. base model and a new or continued LoRA (gradient checkpointing on by default here)
    model = load_model_for_training(model_args, lora_args, train_args, tokenizer)

    # 3. train and save
    trainer = build_trainer(model, tokenizer, train_args, train_data, val_data, PaddingCollator(tokenizer.pad_token_id))
    train_and_save(trainer, tokenizer, resume)


if __name__ == "__main__":
    main()

"""The model of the training stage: checked base at its precision, k-bit preparation and
checkpointing, a new or continued LoRA, fast LoRA dropout. Shared by the SFT and pretraining recipes."""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from chinese_vicuna.args import LoraArguments, ModelArguments
from chinese_vicuna.model.adapters import add_lora, load_lora, parse_modules_to_save
from chinese_vicuna.model.build import load_checked_model
from chinese_vicuna.model.loading import prepare_for_training
from chinese_vicuna.train.fast_lora import use_fast_lora_dropout


def load_model_for_training(
    model_args: ModelArguments,
    lora_args: LoraArguments,
    train_args: TrainingArguments,
    tokenizer: Any,
    grow_to_tokenizer: bool = False,
    default_modules_to_save: str = "",
) -> Any:
    """The PEFT model ready to train (precision as resolved by `args.parse_args`).

    `grow_to_tokenizer`: resize the base to an expanded tokenizer (continued pretraining);
    `default_modules_to_save`: modules trained in full when --modules_to_save is not given.
    """
    model = load_checked_model(
        model_args.base_model,
        tokenizer,
        model_args.precision,
        model_args.device_map,
        model_args.trust_remote_code,
        model_args.lora_weights,
        model_args.attn_implementation,
        grow_to_tokenizer,
    )
    model = prepare_for_training(model, train_args.gradient_checkpointing)
    if model_args.lora_weights:
        model = load_lora(model, model_args.lora_weights, is_trainable=True, lora_config=model_args.lora_config)
    else:
        modules = parse_modules_to_save(lora_args.modules_to_save, default_modules_to_save)
        model = add_lora(model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target_modules, modules)
    if lora_args.fast_lora_dropout:
        use_fast_lora_dropout(model, autocast=bool(train_args.bf16 or train_args.fp16))
    return model

"""The model of the training stage: checked base at its precision, k-bit preparation and
checkpointing, a new or continued LoRA; then, called by the recipe in view, the changes made
for speed (`apply_training_speedups`) and for saving (`save_without_embedding_copies`).
Shared by every training recipe; docs/architecture.md lists every change made to the model."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import TrainingArguments

from chinese_vicuna.args import LoraArguments, ModelArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.adapters import add_lora, load_lora, parse_modules_to_save, parse_target_modules
from chinese_vicuna.model.build import load_checked_model
from chinese_vicuna.model.loading import prepare_for_training
from chinese_vicuna.model.rope import resolve_rope
from chinese_vicuna.train.fast_lora import use_fast_lora_dropout
from chinese_vicuna.train.lora_variants import check_lora_variant, lora_variant_config, prepare_variant
from chinese_vicuna.train.packing import use_packed_attention

logger = logging.getLogger(__name__)


def load_model_for_training(
    model_args: ModelArguments,
    lora_args: LoraArguments,
    train_args: TrainingArguments,
    tokenizer: Any,
    grow_to_tokenizer: bool = False,
    default_modules_to_save: str = "",
) -> Any:
    """The PEFT model ready to train (precision as resolved by `args.parse_args`); the recipe then
    calls `apply_training_speedups`.

    `grow_to_tokenizer`: resize the base to an expanded tokenizer (continued pretraining);
    `default_modules_to_save`: modules trained in full when --modules_to_save is not given.
    """
    check_lora_variant(lora_args, model_args.precision, model_args.lora_weights)
    if not model_args.lora_weights:
        check_target_modules(model_args.base_model, lora_args.lora_target_modules, model_args.trust_remote_code)
    model = load_checked_model(
        model_args.base_model,
        tokenizer,
        model_args.precision,
        model_args.device_map,
        model_args.trust_remote_code,
        model_args.lora_weights,
        model_args.attn_implementation,
        grow_to_tokenizer,
        lora_config=model_args.lora_config,
        rope=resolve_rope(model_args.rope_scaling, model_args.rope_factor, model_args.model_max_length, model_args.lora_weights),
    )
    model = prepare_for_training(model, train_args.gradient_checkpointing)
    if model_args.lora_weights:
        model = load_lora(model, model_args.lora_weights, is_trainable=True, lora_config=model_args.lora_config)
    else:
        modules = parse_modules_to_save(lora_args.modules_to_save, default_modules_to_save)
        model = add_lora(
            model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target_modules, modules,
            lora_variant_config(lora_args),
        )  # fmt: skip
        prepare_variant(model, lora_args, model_args.base_model)
    return model


def apply_training_speedups(model: Any, lora_args: LoraArguments, train_args: TrainingArguments) -> list[str]:
    """The changes made to a loaded model for speed, same results (tests/test_fast_lora.py,
    tests/test_packing.py); logged and returned:
    - `--fast_lora_dropout`: every LoRA layer's nn.Dropout → `FastDropout` (train/fast_lora.py);
    - `--packing`: an sdpa model's attention → `packed_sdpa_attention`, within each packed
      sequence (train/packing.py `use_packed_attention`). The packed loss also runs the last
      layer only at trained positions, for the span of each forward (`last_layer_at_targets`);
    - `--torch_compile` (true, or auto on CUDA): every decoder layer through one compiled forward,
      the loss' chunks compiled, the compile cache beside the data cache (train/compile.py,
      tests/test_compile.py)."""
    changes = []
    if lora_args.fast_lora_dropout:
        layers = use_fast_lora_dropout(model, autocast=bool(train_args.bf16 or train_args.fp16))
        changes.append(f"fast LoRA dropout in {layers} layers")
    if getattr(train_args, "packing", False):
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        before = config._attn_implementation
        use_packed_attention(model)
        if config._attn_implementation != before:
            changes.append(f"attention {before} → {config._attn_implementation}")
    if getattr(train_args, "torch_compile", False):
        if train_args.deepspeed:
            logger.warning("--torch_compile true stands aside under DeepSpeed (its hooks gather and partition weights around each layer)")
        else:
            from chinese_vicuna.train.compile import compile_for_training

            backend, mode = getattr(train_args, "compile_backend", None), getattr(train_args, "compile_mode", None)
            changes.append(compile_for_training(model, backend, mode))
    if changes:
        logger.info("model changes for speed: %s", "; ".join(changes))
    return changes


def save_without_embedding_copies(model: Any) -> None:
    """The adapter's save stores `modules_to_save` embeddings once: PEFT's `save_embedding_layers="auto"`
    would add the resized base embed_tokens and lm_head a second time (continued pretraining with
    both trained in full). Trainer saves through `model.save_pretrained` and has no save option for
    it, so the instance's `save_pretrained` gets `save_embedding_layers=False` bound."""
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)


def skeleton(base_model: str, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The base model's modules without weights (from its config.json, in milliseconds), or None
    where the config cannot be read here (the real load then says why)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_target_modules(base_model: str, value: str, trust_remote_code: bool = False) -> None:
    """Every --lora_target_modules name matches a module of the base (PEFT's rule: the name, or a
    dotted suffix of it), checked on a skeleton before the weights load: PEFT itself silently skips
    a typo when another name matches."""
    targets = parse_target_modules(value)
    model = skeleton(base_model, trust_remote_code) if isinstance(targets, list) else None
    if model is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"--lora_target_modules {value}: {', '.join(unknown)} {'matches' if len(unknown) == 1 else 'match'} no module of "
            f"{base_model}; its linear modules are {','.join(linear)} (or pass all-linear)"
        )

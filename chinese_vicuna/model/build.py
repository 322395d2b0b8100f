"""A ready model for each stage: the checked base, and base (+ LoRA) for inference.

The training stage's PEFT model is assembled in `train/model.py` from the same `load_checked_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.model.adapters import (
    adapter_tokenizer_path,
    adapter_vocab_rows,
    check_adapter_matches_base,
    load_lora,
    read_adapter,
    resize_to_adapter,
)
from chinese_vicuna.model.loading import check_special_tokens, check_vocab, load_base_model, load_tokenizer, resize_embeddings_to_tokenizer
from chinese_vicuna.model.rope import adapter_rope_settings, apply_rope_scaling


def load_checked_model(
    base_model: str,
    tokenizer: Any,
    precision: str = "fp32",
    device_map: Any = None,
    trust_remote_code: bool = False,
    lora_weights: str | None = None,
    attn_implementation: str | None = None,
    grow_to_tokenizer: bool = False,
    lora_config: str | None = None,
    rope: dict[str, Any] | None = None,
) -> Any:
    """The base model, with its special tokens and vocabulary checked against `tokenizer`.

    With `lora_weights`, an adapter trained on an expanded vocabulary first grows the base to
    its rows, so the vocabulary check compares the tokenizer with what will actually run.
    `grow_to_tokenizer` (continued pretraining after vocabulary expansion) resizes the base to
    the tokenizer instead of refusing a larger one. `rope`: RoPE scaling (model/rope.py); default:
    what the adapter was trained with.
    """
    if lora_weights and Path(lora_weights).exists():
        # a missing config or weights file is found now, not after minutes of loading a 13B base
        read_adapter(lora_weights, lora_config)
    model = load_base_model(base_model, precision, device_map, trust_remote_code, attn_implementation)
    apply_rope_scaling(model, rope if rope is not None else adapter_rope_settings(lora_weights))
    check_special_tokens(model, tokenizer, base_model)
    if lora_weights:
        resize_to_adapter(model, lora_weights, tokenizer)
    if grow_to_tokenizer:
        resize_embeddings_to_tokenizer(model, tokenizer, base_model)
    check_vocab(model, tokenizer, base_model)
    return model


def load_for_inference(
    base_model: str,
    lora_weights: str | None = None,
    precision: str = "fp32",
    device_map: Any = None,
    tokenizer_path: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    lora_config: str | None = None,
    rope: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Model (base, base + LoRA, or a merged model) and tokenizer, in eval mode.

    `lora_weights`: an adapter folder this project wrote (output_dir or a checkpoint-N), one
    written by stock PEFT, or a hub id. `precision` is a decided one (`devices.decide_precision`).
    """
    if not base_model:
        raise UserError("--base_model is required: a Hugging Face model folder or hub id (a merged model works too)")
    # A LoRA trained on an expanded vocabulary (tools/pretrain.py) carries full embeddings and
    # the tokenizer it was trained with: that tokenizer is the one to use.
    tokenizer = load_tokenizer(tokenizer_path or adapter_tokenizer_path(lora_weights) or base_model, trust_remote_code)
    model = load_checked_model(
        base_model,
        tokenizer,
        precision,
        device_map,
        trust_remote_code,
        lora_weights,
        attn_implementation,
        lora_config=lora_config,
        rope=rope,
    )
    if lora_weights:
        resized = Path(lora_weights).is_dir() and adapter_vocab_rows(lora_weights) is not None
        check_adapter_matches_base(lora_weights, model, tokenizer, vocab_resized=resized)
        model = load_lora(model, lora_weights, lora_config=lora_config)
    model.eval()
    return model, tokenizer


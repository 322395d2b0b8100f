"""RoPE scaling for a longer context (docs/lora_variants.md, "Long context"): linear position
interpolation, dynamic NTK, YaRN and Llama 3's, applied to a loaded model's config and rotary
embeddings, recorded with the adapter (`rope_scaling.json`) so that inference and merging apply it
again, and written into a merged model's config.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text, read_json

logger = logging.getLogger(__name__)

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
ROPE_FILE = "rope_scaling.json"  # beside adapter_config.json: what the adapter was trained with


def rope_settings(kind: str | None, factor: float, model_max_length: int | None) -> dict[str, Any] | None:
    """The flags as one record (None: no scaling), checked."""
    if not kind or kind in ("none", "default"):
        if model_max_length:
            raise UserError(f"--model_max_length {model_max_length} needs --rope_scaling linear|dynamic|yarn|llama3 and --rope_factor")
        return None
    if kind not in ROPE_TYPES:
        raise UserError(f"--rope_scaling {kind}: use one of {', '.join(ROPE_TYPES)}")
    if not factor > 1:
        raise UserError(f"--rope_factor {factor}: must be > 1 (the context grows by this factor, e.g. 2 or 4)")
    if kind == "dynamic" and model_max_length:
        raise UserError(
            f"--model_max_length {model_max_length} with --rope_scaling dynamic: dynamic NTK has no fixed window "
            "(it scales with the sequence past the original one); drop --model_max_length"
        )
    return {"rope_type": kind, "factor": float(factor), "model_max_length": model_max_length}


def scaled_config(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict with the RoPE scaling: transformers 5's `rope_parameters` (and the
    `rope_scaling` key older readers and llama.cpp's converter look for) and the new window."""
    out = dict(config)
    params = dict(out.get("rope_parameters") or {})
    params.setdefault("rope_theta", float(out.get("rope_theta") or 10000.0))
    if params.get("rope_type", "default") not in ("default", settings["rope_type"]):
        raise UserError(
            f"the base already uses rope_type {params['rope_type']!r}; it cannot be scaled again with {settings['rope_type']!r}"
        )
    original = int(params.get("original_max_position_embeddings") or out.get("max_position_embeddings") or 2048)
    params.update(rope_type=settings["rope_type"], factor=settings["factor"], original_max_position_embeddings=original)
    if settings["rope_type"] == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    out["rope_parameters"] = params
    out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    # transformers' dynamic NTK scales only past max_position_embeddings: it must stay the original window
    scaled_window = original if settings["rope_type"] == "dynamic" else original * settings["factor"]
    out["max_position_embeddings"] = int(settings.get("model_max_length") or scaled_window)
    return out


def context_length(config: Any) -> int | None:
    """How many positions a model (or config dict) is meant to run: `max_position_embeddings`, except
    under dynamic NTK, where that is the original window and the context is `factor` times it."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    window = get("max_position_embeddings")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    if window and isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return int(window * float(rope.get("factor", 1.0)))
    return int(window) if window else None


def apply_rope_scaling(model: Any, settings: dict[str, Any] | None) -> None:
    """Scale a loaded model's RoPE in place: its config and every rotary-embedding module, rebuilt
    from the new config (their frequencies are computed at construction)."""
    if settings is None:
        return
    import torch

    config = model.config
    scaled = scaled_config(config.to_dict(), settings)
    config.rope_parameters = scaled["rope_parameters"]
    config.max_position_embeddings = scaled["max_position_embeddings"]
    rebuilt = 0
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                device = next((b.device for b in child.buffers()), torch.device("cpu"))
                setattr(module, child_name, type(child)(config=config).to(device))
                rebuilt += 1
    if not rebuilt:
        raise UserError(f"--rope_scaling: {type(model).__name__} has no rotary embedding module to scale")
    model._rope_settings = settings
    logger.info(
        "RoPE %s × %g: context %d → %d positions",
        settings["rope_type"], settings["factor"], scaled["rope_parameters"]["original_max_position_embeddings"], context_length(config),
    )  # fmt: skip


def save_rope_settings(folder: str | os.PathLike, model: Any) -> None:
    """`rope_scaling.json` in an adapter folder, when the model was trained with RoPE scaling."""
    settings = getattr(model, "_rope_settings", None)
    if settings is None and hasattr(model, "get_base_model"):
        settings = getattr(model.get_base_model(), "_rope_settings", None)
    if settings is not None:
        atomic_write_text(Path(folder) / ROPE_FILE, json.dumps(settings, indent=2) + "\n")


def adapter_rope_settings(adapter_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The RoPE scaling an adapter was trained with (its `rope_scaling.json`), or None."""
    if not adapter_dir or not (Path(adapter_dir) / ROPE_FILE).is_file():
        return None
    saved = read_json(Path(adapter_dir) / ROPE_FILE)
    return rope_settings(saved.get("rope_type"), float(saved.get("factor", 1.0)), saved.get("model_max_length"))


def resolve_rope(kind: str | None, factor: float, model_max_length: int | None, adapter_dir: str | None) -> dict[str, Any] | None:
    """The flags' scaling, else the adapter's own; both given and different is refused."""
    asked = rope_settings(kind, factor, model_max_length)
    saved = adapter_rope_settings(adapter_dir)
    if asked and saved and (asked["rope_type"], asked["factor"]) != (saved["rope_type"], saved["factor"]):
        raise UserError(
            f"--rope_scaling {asked['rope_type']} --rope_factor {asked['factor']:g}, but {adapter_dir}/{ROPE_FILE} says the adapter was "
            f"trained with {saved['rope_type']} × {saved['factor']:g}: drop the flags (the adapter's own are applied)"
        )
    return asked or saved

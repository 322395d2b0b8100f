"""LoRA adapters: read, check against a base, resize the base to an adapter's vocabulary, load, create.

The one owner of adapter/base compatibility for training, inference and merge alike.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import read_json
from chinese_vicuna.model.loading import (
    _full_shape,
    _is_quantized,
    check_safetensors,
    embedding_rows,
    has_tokenizer,
    resize_embeddings,
    tokenizer_length,
    unused_vocab_rows,
)

logger = logging.getLogger(__name__)

# Adapter weight files, in the order they are looked for: PEFT writes safetensors; the LoRAs
# Chinese-Vicuna and Chinese-LLaMA-Alpaca published (PEFT of 2023) ship adapter_model.bin.
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json keys of that old PEFT which today's PEFT does not know (it would warn that
# the adapter was "saved using a higher version"): dropped when the config is read.
OBSOLETE_CONFIG_KEYS = ("enable_lora", "merge_weights")


def adapter_weights_file(folder: str | os.PathLike) -> Path | None:
    """The adapter's weights file (safetensors, else .bin), or None."""
    for name in ADAPTER_WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_adapter_config(config_file: str | os.PathLike) -> dict[str, Any]:
    """An adapter_config.json without the obsolete keys (the file itself is left as it is)."""
    config = read_json(Path(config_file))
    return {k: v for k, v in config.items() if k not in OBSOLETE_CONFIG_KEYS}


def load_adapter_tensors(weights: Path) -> dict[str, Any]:
    """All tensors of an adapter weights file; a .bin is unpickled with weights_only (no code runs)."""
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    import torch

    try:
        return torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{weights}: cannot be read as a weights-only PyTorch file ({str(exc).splitlines()[0]})") from None


def adapter_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor in an adapter weights file (safetensors: headers only)."""
    if weights.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in load_adapter_tensors(weights).items()}
    from safetensors import safe_open

    check_safetensors(weights)  # truncated or damaged: one line naming the file
    with safe_open(str(weights), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


CHECKPOINT_WEIGHTS = "pytorch_model.bin"  # what a Chinese-Vicuna checkpoint-N holds: the LoRA state dict only


def _missing_adapter_config(path: Path) -> UserError:
    if (path / CHECKPOINT_WEIGHTS).is_file():
        return UserError(
            f"{path}: {CHECKPOINT_WEIGHTS} without adapter_config.json (a Chinese-Vicuna checkpoint-N): name the LoRA config it "
            "was trained with, e.g. --lora_config config-sample/adapter_config.json"
        )
    return UserError(f"{path}: no adapter_config.json; --lora_weights must be a PEFT adapter folder (the output_dir or a checkpoint-N)")


def adapter_files(folder: str | os.PathLike, lora_config: str | None = None) -> tuple[Path, Path | None]:
    """(adapter config file, weights file) of an adapter folder, read in place: the folder's own
    adapter_config.json, or `lora_config` for a checkpoint-N holding only pytorch_model.bin."""
    path = Path(folder)
    if (path / "adapter_config.json").is_file():
        return path / "adapter_config.json", adapter_weights_file(path)
    if lora_config and (path / CHECKPOINT_WEIGHTS).is_file():
        if not Path(lora_config).is_file():
            raise UserError(f"--lora_config {lora_config}: file not found")
        return Path(lora_config), path / CHECKPOINT_WEIGHTS
    raise _missing_adapter_config(path)


@dataclass
class AdapterInfo:
    path: Path
    config: dict[str, Any]
    weights: Path
    shapes: dict[str, tuple[int, ...]]
    embed_rows: int | None = None  # full embed_tokens saved (modules_to_save, resized vocabulary)
    head_rows: int | None = None  # full lm_head saved
    tokenizer_len: int | None = None
    lora_config: str | None = None  # the named config of a checkpoint-N without adapter_config.json


def inner_name(adapter_key: str) -> str:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` → `model.layers.0.q_proj.lora_A.weight`."""
    return adapter_key.split("base_model.model.", 1)[-1]


def read_adapter(folder: str | os.PathLike, lora_config: str | None = None) -> AdapterInfo:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--lora_weights {path}: folder not found (give a PEFT adapter folder: the output_dir or a checkpoint-N)")
    cfg_path, weights = adapter_files(path, lora_config)
    config = read_adapter_config(cfg_path)
    if weights is None:
        raise UserError(f"{path}: no adapter_model.safetensors or adapter_model.bin; the adapter folder is incomplete")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
    shapes = {inner_name(key): shape for key, shape in adapter_tensor_shapes(weights).items()}
    info = AdapterInfo(path, config, weights, shapes, lora_config=None if cfg_path.parent == path else str(cfg_path))
    for name, shape in shapes.items():
        if name.endswith("embed_tokens.weight"):
            info.embed_rows = shape[0]
        elif name.endswith("lm_head.weight"):
            info.head_rows = shape[0]
    if has_tokenizer(path):
        info.tokenizer_len = tokenizer_length(path)
    return info


def check_lora_modules(info: AdapterInfo, base_shapes: dict[str, tuple[int, ...]], vocab: int) -> None:
    """Every LoRA pair must fit the module it adapts: a LoRA for another base fails here."""
    for name, shape in info.shapes.items():
        m = re.match(r"(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.weight$", name) or re.match(
            r"(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name
        )
        if not m:
            continue
        module, kind = m.group(1), m.group(2)
        target = base_shapes.get(module + ".weight")
        if target is None:
            raise UserError(
                f"{info.weights}: adapts {module}, which the base model does not have: this LoRA was made for another model architecture"
            )
        rows, cols = target
        if module.endswith(("embed_tokens", "lm_head")):
            rows = vocab
        if kind == "lora_A" and shape[1] != cols:
            raise UserError(
                f"{info.weights}: {module} expects inputs of size {shape[1]} but the base model's layer has {cols}: "
                "this LoRA was made for another base model"
            )
        if kind == "lora_B" and shape[0] != rows:
            raise UserError(
                f"{info.weights}: {module} outputs {shape[0]} values but the base model's layer has {rows}: "
                "this LoRA was made for another base model (or another vocabulary)"
            )
        if kind == "lora_embedding_A" and shape[1] != vocab:
            raise UserError(
                f"{info.weights}: {module} has a LoRA over {shape[1]} tokens but the model has {vocab} embedding rows at this point: "
                "apply the adapter that resized the vocabulary first, or use the matching base"
            )


def check_adapter_matches_base(adapter_dir: str, model: Any, tokenizer: Any, vocab_resized: bool = False) -> None:
    """A LoRA for another base is a UserError, even where the shapes happen to agree.

    Two signs: the base named in `adapter_config.json` is a local model whose config differs
    (vocabulary, width, depth), or the adapter folder carries the tokenizer it was trained
    with and that tokenizer differs from the one in use (e.g. an expanded Chinese vocabulary).
    """
    path = Path(adapter_dir)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        return  # a hub id: load_lora's shape checks and PEFT apply
    named = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    named_cfg = Path(named) / "config.json" if named else None
    if named_cfg is not None and named_cfg.is_file():
        theirs = json.loads(named_cfg.read_text(encoding="utf-8"))
        ours = model.config.to_dict()
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size") + (() if vocab_resized else ("vocab_size",))
        for key in keys:
            if key in theirs and key in ours and theirs[key] != ours[key]:
                raise UserError(
                    f"{cfg_path}: this LoRA was trained on {named} ({key}={theirs[key]}) but the base model has {key}={ours[key]}; "
                    "load it with the base model it was trained on"
                )
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        theirs_tok = AutoTokenizer.from_pretrained(str(path))
        if len(theirs_tok) != len(tokenizer) or theirs_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"{path}: the tokenizer saved with this LoRA has {len(theirs_tok)} tokens but the one in use has {len(tokenizer)} "
                "(or their vocabularies differ): the LoRA was trained with another tokenizer/base; load its base model, "
                f"or pass --tokenizer_path {path} if the base model has that vocabulary"
            )


def adapter_vocab_rows(adapter_dir: str) -> int | None:
    """Rows of the full embed_tokens / lm_head an adapter saved (modules_to_save), if any."""
    weights = adapter_weights_file(adapter_dir)
    if weights is None:
        return None
    for key, shape in adapter_tensor_shapes(weights).items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and "lora_" not in key:
            return int(shape[0])
    return None


def resize_to_adapter(model: Any, adapter_dir: str, tokenizer: Any = None) -> None:
    """Grow the base's vocabulary to the adapter's, for a LoRA trained on an expanded tokenizer.

    Such an adapter (tools/pretrain.py --stage lora) carries the whole embed_tokens and
    lm_head, so the base only needs the rows to exist. With `tokenizer`, its size must be
    the adapter's: the tokenizer saved in the adapter folder is the one to use.
    """
    rows = adapter_vocab_rows(adapter_dir)
    if rows is None:
        return
    if tokenizer is not None and (len(tokenizer) > rows or unused_vocab_rows(len(tokenizer), rows)):
        raise UserError(
            f"{adapter_weights_file(adapter_dir)} has {rows} embedding rows but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')} has {len(tokenizer)} tokens: "
            f"use the tokenizer saved with the adapter (--tokenizer_path {adapter_dir})"
        )
    n_embed = embedding_rows(model)
    if rows > n_embed and not _is_quantized(model.get_input_embeddings().weight):
        logger.info("%s was trained with a %d-token vocabulary; resizing the base from %d rows", adapter_dir, rows, n_embed)
        resize_embeddings(model, rows)


def adapter_tokenizer_path(lora_weights: str | None) -> str | None:
    """The adapter folder, when it carries full embeddings and the tokenizer it was trained with."""
    if not (lora_weights and Path(lora_weights).is_dir() and (Path(lora_weights) / "tokenizer.json").is_file()):
        return None
    return lora_weights if adapter_vocab_rows(lora_weights) else None


def parse_target_modules(value: str | list[str]) -> str | list[str]:
    """`q_proj,v_proj` → list; `all-linear` stays the string PEFT understands."""
    if isinstance(value, list):
        return value
    value = value.strip()
    if value == "all-linear":
        return value
    modules = [m.strip() for m in value.strip("[]").replace("'", "").replace('"', "").split(",") if m.strip()]
    if not modules:
        raise UserError("--lora_target_modules is empty; give a comma list like q_proj,v_proj or all-linear")
    return modules


def check_adapter_fits(model: Any, adapter_dir: str, lora_config: str | None = None) -> None:
    """A LoRA made for another base (other shapes or vocabulary) → a clear error, not garbage."""
    path = Path(adapter_dir)
    if not path.is_dir():
        return  # a hub id: PEFT resolves and checks it
    _, weights = adapter_files(path, lora_config)
    if weights is None:
        raise UserError(f"{path}: no adapter_model.safetensors or adapter_model.bin; the adapter folder is incomplete")
    params = dict(model.named_parameters())
    by_suffix = {name.split("base_model.model.")[-1]: p for name, p in params.items()}
    for key, shape in adapter_tensor_shapes(weights).items():
        inner = key.split("base_model.model.", 1)[-1]
        # embed_tokens / lm_head saved in full (modules_to_save, resized vocabularies)
        if inner.endswith(("embed_tokens.weight", "lm_head.weight")):
            target = by_suffix.get(inner)
            if target is not None and _full_shape(target) != shape and len(shape) == 2 and shape[0] != _full_shape(target)[0]:
                raise UserError(
                    f"{weights}: {inner} has {shape[0]} rows but the base model's vocabulary has {_full_shape(target)[0]}: "
                    "this LoRA was trained with another tokenizer/base; load the matching base model or tokenizer"
                )
            continue
        if ".lora_A." in inner:
            module = inner.split(".lora_A.")[0]
            base = by_suffix.get(module + ".weight")
            if base is None:
                base = by_suffix.get(module + ".base_layer.weight")
            if base is not None and len(_full_shape(base)) == 2 and not _is_quantized(base) and shape[1] != _full_shape(base)[1]:
                raise UserError(
                    f"{weights}: {module} expects inputs of size {shape[1]} but the base model's layer has {_full_shape(base)[1]}: "
                    "this LoRA was made for another base model"
                )


def load_lora(model: Any, adapter_dir: str, is_trainable: bool = False, lora_config: str | None = None) -> Any:
    """PeftModel from an adapter folder (ours, a checkpoint-N, stock PEFT's, or a hub id).

    A base for a LoRA trained on an expanded vocabulary is grown first by `model.build.load_checked_model`."""
    from peft import PeftModel

    check_adapter_fits(model, adapter_dir, lora_config)
    config = None
    if Path(adapter_dir).is_dir():
        from peft import PeftConfig

        # read here, without the obsolete keys PEFT would warn about
        cfg_file, weights = adapter_files(adapter_dir, lora_config)
        config = PeftConfig.from_peft_type(**read_adapter_config(cfg_file))
        if weights is not None and weights.name == CHECKPOINT_WEIGHTS:
            return _load_checkpoint_state(model, config, weights, is_trainable)
    try:
        if config is not None:
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable, config=config)
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    except (OSError, ValueError) as exc:
        raise UserError(f"{adapter_dir}: cannot load the LoRA ({str(exc).splitlines()[0]})") from None
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise UserError(f"{adapter_dir}: this LoRA was made for another base model ({str(exc).splitlines()[-1].strip()})") from None
        raise


def _load_checkpoint_state(model: Any, config: Any, weights: Path, is_trainable: bool) -> Any:
    """A LoRA from a bare state dict (Chinese-Vicuna's checkpoint-N/pytorch_model.bin) and its named config."""
    from peft import get_peft_model, set_peft_model_state_dict

    config.inference_mode = not is_trainable
    peft_model = get_peft_model(model, config)
    state = load_adapter_tensors(weights)
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or any("lora_" in k for k in result.unexpected_keys) or not any("lora_" in k for k in state):
        raise UserError(
            f"{weights}: its tensors do not fit the LoRA config given with --lora_config "
            f"({len(missing)} LoRA weights missing, e.g. {(missing or result.unexpected_keys or ['none'])[0]}): name the config it was trained with"
        )
    return peft_model


def add_lora(
    model: Any,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str | list[str] = "q_proj,v_proj",
    modules_to_save: list[str] | None = None,
    variant: dict[str, Any] | None = None,
) -> Any:
    """A fresh LoRA on the given modules; `variant`: LoraConfig fields of a LoRA variant
    (use_dora, use_rslora, init_lora_weights; train/lora_variants.py)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
        **(variant or {}),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"--lora_target_modules {target_modules!r}: {str(exc).splitlines()[0]}") from None


def parse_modules_to_save(value: str | None, default: str = "") -> list[str] | None:
    """`embed_tokens,lm_head` → a list; None → `default`; `none` or empty → None."""
    value = default if value is None else value
    modules = [m.strip() for m in value.split(",") if m.strip() and m.strip().lower() != "none"]
    return modules or None

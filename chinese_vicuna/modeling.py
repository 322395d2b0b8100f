"""Load tokenizer, base model and LoRA at a precision and a placement.

Precisions: fp32, bf16, fp16, 8bit (LLM.int8), 4bit (NF4 + double quantization). Placement:
one device, `device_map="auto"` across GPUs, or one device per process under torchrun.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "half", "8bit", "4bit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "-1"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def bf16_supported() -> bool:
    """bf16 on a CUDA GPU that has it (Ampere+), or on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def cpu_has_native_bf16() -> bool:
    """An x86 CPU with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 runs ~4x fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, load_in_8bit: bool = False, load_in_4bit: bool = False) -> str:
    """`auto`: Chinese-Vicuna's 8-bit on a CUDA GPU, fp32 weights on the CPU; `half`: bf16 where supported, else fp16."""
    if load_in_8bit and load_in_4bit:
        raise UserError("--load_in_8bit and --load_in_4bit are exclusive; pick one")
    if load_in_8bit:
        return "8bit"
    if load_in_4bit:
        return "4bit"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "8bit" if torch.cuda.is_available() else "fp32"
    if precision == "half":  # the fp16 launchers: bf16 on Ampere+ and the CPU, fp16 on older GPUs
        return "bf16" if bf16_supported() else "fp16"
    return precision


def compute_dtype() -> torch.dtype:
    """bf16 where the hardware has it, else fp16 (GPU) — for k-bit compute and half loads."""
    return torch.bfloat16 if bf16_supported() else torch.float16


def default_device_map(device_map: str | None = None) -> Any:
    """torchrun: each process its own GPU; one GPU: that GPU; CPU: None. `auto` spreads layers."""
    if device_map:
        return device_map
    if torch.cuda.is_available():
        rank = local_rank()
        return {"": rank if rank >= 0 else torch.cuda.current_device()}
    return None


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer with a pad id set (unk, as alpaca-lora; padding is masked by position)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]}); check --base_model / the tokenizer path") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no eos token; set eos_token in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # Not EOS: a pad equal to EOS invites collators to mask real EOS tokens.
        tokenizer.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    tokenizer.padding_side = "left"  # generation batches; training pads itself (PaddingCollator)
    return tokenizer


def check_special_tokens(model: Any, tokenizer: Any, where: str = "") -> None:
    """Make the model's bos/eos agree with the tokenizer's, saying which file was wrong.

    Broken configs in the wild (decapoda-research: bos=0, eos=1) keep generation from ever
    stopping; the tokenizer is the source of truth for what the data contains.
    """
    for name in ("bos_token_id", "eos_token_id"):
        want = getattr(tokenizer, name)
        for cfg_name, cfg in (("config.json", model.config), ("generation_config.json", getattr(model, "generation_config", None))):
            if cfg is None:
                continue
            have = getattr(cfg, name, None)
            if isinstance(have, list):
                continue  # e.g. Llama-3 lists several stop ids
            if have is not None and want is not None and have != want:
                logger.warning(
                    "%s%s has %s=%s but the tokenizer says %s (%r); using the tokenizer's id. Fix %s to silence this.",
                    f"{where}/" if where else "",
                    cfg_name,
                    name,
                    have,
                    want,
                    getattr(tokenizer, name.replace("_id", "")),
                    cfg_name,
                )
                setattr(cfg, name, want)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding, also under ZeRO-3 (where the weight itself is an empty shard)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def check_vocab(model: Any, tokenizer: Any, base_model: str) -> None:
    """The embedding must cover every token id; say which file disagrees."""
    n_embed = embedding_rows(model)
    if len(tokenizer) > n_embed:
        raise UserError(
            f"tokenizer has {len(tokenizer)} tokens but {base_model} has {n_embed} embedding rows: "
            "use the tokenizer that belongs to this model (or resize the embeddings, e.g. with tools/pretrain.py)"
        )
    if unused_vocab_rows(len(tokenizer), n_embed):
        tok_path = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(
            f"{tok_path} has {len(tokenizer)} tokens but {base_model}/config.json has vocab_size {n_embed} ({n_embed} embedding rows): "
            f"the model's vocabulary was expanded and this tokenizer was not; use the expanded tokenizer "
            f"(its tokenizer.model / tokenizer.json / tokenizer_config.json in {base_model}, or --tokenizer_path)"
        )


def unused_vocab_rows(n_tokens: int, n_rows: int) -> bool:
    """True when an embedding has far more rows than the tokenizer has tokens.

    Models pad their embedding for speed by a fraction of a percent (Qwen2: 151936 rows for
    151665 tokens); an expanded vocabulary used with the old tokenizer differs by tens of
    percent (Chinese-LLaMA: 49953 vs 32000).
    """
    return n_rows - n_tokens > max(64, n_rows // 100)


def resize_embeddings(model: Any, new_rows: int) -> int:
    """Grow the input and output embeddings to `new_rows`; new rows = mean of the old rows.

    The mean (Chinese-LLaMA's and Hewitt's choice) keeps the output distribution close to
    the old one, so held-out loss starts where it was instead of jumping. Returns rows added.
    """
    old_rows = embedding_rows(model)
    if new_rows <= old_rows:
        return 0
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old_rows:] = emb[:old_rows].mean(dim=0, keepdim=True).to(emb.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old_rows:] = out.weight[:old_rows].mean(dim=0, keepdim=True).to(out.weight.dtype)
    logger.info("resized the embeddings from %d to %d rows (new rows = mean of the old ones)", old_rows, new_rows)
    return new_rows - old_rows


def resize_embeddings_to_tokenizer(model: Any, tokenizer: Any, base_model: str) -> int:
    """Resize to an expanded tokenizer; a tokenizer smaller than the model is an error."""
    n_embed = embedding_rows(model)
    if unused_vocab_rows(len(tokenizer), n_embed):
        check_vocab(model, tokenizer, base_model)  # raises, naming both sizes and files
    return resize_embeddings(model, len(tokenizer))


def adapter_vocab_rows(adapter_dir: str) -> int | None:
    """Rows of the full embed_tokens / lm_head an adapter saved (modules_to_save), if any."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if key.endswith(("embed_tokens.weight", "lm_head.weight")) and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
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
            f"{adapter_dir}/adapter_model.safetensors has {rows} embedding rows but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')} has {len(tokenizer)} tokens: "
            f"use the tokenizer saved with the adapter (--tokenizer_path {adapter_dir})"
        )
    n_embed = embedding_rows(model)
    if rows > n_embed and not _is_quantized(model.get_input_embeddings().weight):
        logger.info("%s was trained with a %d-token vocabulary; resizing the base from %d rows", adapter_dir, rows, n_embed)
        resize_embeddings(model, rows)


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------
def quantization_config(precision: str) -> Any:
    from transformers import BitsAndBytesConfig

    if precision == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
        )
    return None


def load_base_model(
    path: str,
    precision: str = "auto",
    device_map: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """A causal LM in the given precision, placed per `default_device_map`."""
    from transformers import AutoModelForCausalLM

    precision = resolve_precision(precision)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    qconfig = quantization_config(precision)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["dtype"] = compute_dtype() if torch.cuda.is_available() else torch.float32
        kwargs["device_map"] = default_device_map(device_map) or "cpu"
    else:
        kwargs["dtype"] = DTYPES[precision]
        placement = default_device_map(device_map)
        if placement is not None:
            kwargs["device_map"] = placement
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if not (Path(path).is_dir() or "/" in path):
        raise UserError(f"--base_model {path!r}: not a local folder nor a hub id like 'owner/name'")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise UserError(f"{path}: no config.json; --base_model must be a Hugging Face model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    logger.info("loaded %s in %s on %s", path, precision, getattr(model, "hf_device_map", None) or model.device)
    return model


def load_model_and_tokenizer(
    base_model: str, precision: str = "auto", device_map: Any = None, tokenizer_path: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Tokenizer + base model, with the special-token and vocabulary checks."""
    tokenizer = load_tokenizer(tokenizer_path or base_model, trust_remote_code)
    return load_checked_model(base_model, tokenizer, precision, device_map, trust_remote_code), tokenizer


def load_checked_model(
    base_model: str,
    tokenizer: Any,
    precision: str = "auto",
    device_map: Any = None,
    trust_remote_code: bool = False,
    lora_weights: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """The base model, with its special tokens and vocabulary checked against `tokenizer`.

    With `lora_weights`, an adapter trained on an expanded vocabulary first grows the base to
    its rows, so the vocabulary check compares the tokenizer with what will actually run.
    """
    model = load_base_model(base_model, precision, device_map, trust_remote_code, attn_implementation)
    check_special_tokens(model, tokenizer, base_model)
    if lora_weights:
        resize_to_adapter(model, lora_weights, tokenizer)
    check_vocab(model, tokenizer, base_model)
    return model


def adapter_tokenizer_path(lora_weights: str | None) -> str | None:
    """The adapter folder, when it carries full embeddings and the tokenizer it was trained with."""
    if not (lora_weights and Path(lora_weights).is_dir() and (Path(lora_weights) / "tokenizer.json").is_file()):
        return None
    return lora_weights if adapter_vocab_rows(lora_weights) else None


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
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


def prepare_for_training(model: Any, gradient_checkpointing: bool = False) -> Any:
    """k-bit preparation (norms in fp32, input grads) and non-reentrant checkpointing."""
    from peft import prepare_model_for_kbit_training

    kwargs = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    return model


def adapter_base_name(adapter_dir: str) -> tuple[str | None, dict[str, Any]]:
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        return None, {}
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    return cfg.get("base_model_name_or_path"), cfg


def check_adapter_fits(model: Any, adapter_dir: str) -> None:
    """A LoRA made for another base (other shapes or vocabulary) → a clear error, not garbage."""
    path = Path(adapter_dir)
    if not path.is_dir():
        return  # a hub id: PEFT resolves and checks it
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: no adapter_config.json; --lora_weights must be a PEFT adapter folder (the output_dir or a checkpoint-N)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            return
        raise UserError(f"{path}: no adapter_model.safetensors; the adapter folder is incomplete")
    from safetensors import safe_open

    params = dict(model.named_parameters())
    by_suffix = {name.split("base_model.model.")[-1]: p for name, p in params.items()}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            shape = tuple(f.get_slice(key).get_shape())
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


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape; under ZeRO-3 the local tensor is an empty shard and ds_shape has it."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _is_quantized(param: torch.Tensor) -> bool:
    return param.dtype in (torch.int8, torch.uint8) or type(param).__name__ in ("Params4bit", "Int8Params")


def load_lora(model: Any, adapter_dir: str, is_trainable: bool = False, tokenizer: Any = None) -> Any:
    """PeftModel from an adapter folder (ours, a checkpoint-N, stock PEFT's, or a hub id)."""
    from peft import PeftModel

    resize_to_adapter(model, adapter_dir, tokenizer)  # a LoRA trained on an expanded vocabulary
    check_adapter_fits(model, adapter_dir)
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    except (OSError, ValueError) as exc:
        raise UserError(f"{adapter_dir}: cannot load the LoRA ({str(exc).splitlines()[0]})") from None
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise UserError(f"{adapter_dir}: this LoRA was made for another base model ({str(exc).splitlines()[-1].strip()})") from None
        raise


def add_lora(
    model: Any,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str | list[str] = "q_proj,v_proj",
    modules_to_save: list[str] | None = None,
) -> Any:
    """A fresh LoRA on the given modules."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"--lora_target_modules {target_modules!r}: {str(exc).splitlines()[0]}") from None


def trainable_parameters(model: Any) -> tuple[int, int]:
    # ds_numel: under ZeRO-3 a partitioned parameter's local tensor is empty
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total

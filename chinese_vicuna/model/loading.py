"""Tokenizer and base model at a precision and a placement, with the special-token and
vocabulary checks; embedding resizes; k-bit preparation for training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.devices import DTYPES, compute_dtype, default_device_map
from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer with a pad id set (unk, as alpaca-lora; padding is masked by position)."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not has_tokenizer(Path(path)):
        raise UserError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); copy the model's tokenizer files "
            "there or pass --tokenizer_path"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # transformers 5 says ValueError when no backend can be built
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
    precision: str = "fp32",
    device_map: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """A causal LM in the given precision, placed per `default_device_map`."""
    from transformers import AutoModelForCausalLM

    if precision not in DTYPES and precision not in ("8bit", "4bit"):
        raise UserError(f"precision {precision!r}: use fp32, bf16, fp16, 8bit or 4bit (decide auto with devices.decide_precision)")
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
    if Path(path).is_dir():
        for weights in sorted(Path(path).glob("*.safetensors")):
            check_safetensors(weights)  # a half-copied shard: one line naming it, before transformers reads it
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    logger.info("loaded %s in %s on %s", path, precision, getattr(model, "hf_device_map", None) or model.device)
    return model


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


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape; under ZeRO-3 the local tensor is an empty shard and ds_shape has it."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _is_quantized(param: torch.Tensor) -> bool:
    return param.dtype in (torch.int8, torch.uint8) or type(param).__name__ in ("Params4bit", "Int8Params")


def trainable_parameters(model: Any) -> tuple[int, int]:
    # ds_numel: under ZeRO-3 a partitioned parameter's local tensor is empty
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, sentencepiece, byte-level BPE


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES)


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header agrees with its size (read: 8 bytes + the header, no
    weights); a truncated or damaged file is a UserError naming it, not a SafetensorError."""
    redo = "copy or download it again"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise UserError(f"{path}: truncated ({size} bytes, shorter than its own header); {redo}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise UserError(f"{path}: not a readable safetensors file (damaged header); {redo}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc}); check its permissions") from None
    if 8 + n + end != size:
        raise UserError(f"{path}: truncated or damaged ({size} bytes; its header describes {8 + n + end}); {redo}")


def tokenizer_length(folder: Path) -> int:
    return len(load_tokenizer(str(folder)))

"""GGUF files for llama.cpp: a merged LLaMA-architecture HF model → one GGUF file.

The `gguf` package writes the file (architecture `llama`, the sentencepiece vocabulary of
tokenizer.model with its scores and token types, added tokens, special token ids, the q/k
rows permuted to llama.cpp's rotary layout); q8_0 / q4_0 / q4_k_m are made from the f16 file
by llama.cpp's own quantizer through llama-cpp-python (`pip install -r requirements-llamacpp.txt`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from chinese_vicuna.data.fast_tokenize import GGUF_FOLDS_SPACE_KEY, GGUF_RESTARTS_KEY, folds_leading_space, restarts_after_special
from chinese_vicuna.errors import UserError
from chinese_vicuna.export.names import gguf_name, unpermute_qk
from chinese_vicuna.export.tensors import TensorIndex
from chinese_vicuna.files import make_readable, read_json
from chinese_vicuna.prompts import GGUF_TEMPLATE_KEY, TEMPLATE_FILE, llama_cpp_chat_template, load_template

logger = logging.getLogger(__name__)

OUTTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_* values


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and token types as llama.cpp's SPM tokenizer expects them."""
    import sentencepiece as spm
    from gguf import TokenType
    from transformers import AutoTokenizer

    sp_path = model_dir / "tokenizer.model"
    if not sp_path.is_file():
        raise UserError(
            f"{model_dir}: no tokenizer.model; the GGUF llama vocabulary needs the sentencepiece model with its scores: "
            "copy the tokenizer.model that belongs to this tokenizer into the folder"
        )
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    # tokens added on top of the sentencepiece model (tokenizer.add_tokens): matched whole, as in HF
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    if len(hf) > vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {len(hf)} tokens but config.json has vocab_size {vocab_size}")
    for i in range(len(tokens), len(hf)):
        piece = hf.convert_ids_to_tokens(i)
        tokens.append(piece.encode("utf-8"))
        scores.append(-1000.0)
        types.append(TokenType.CONTROL if piece in hf.all_special_tokens else TokenType.USER_DEFINED)
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padding)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    return tokens, scores, [int(t) for t in types]


def special_ids(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    probe = tok("a")["input_ids"]
    return {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "unk": tok.unk_token_id,
        "pad": tok.pad_token_id,
        "add_bos": bool(probe) and probe[0] == tok.bos_token_id,
        "add_eos": bool(probe) and probe[-1] == tok.eos_token_id and tok.eos_token_id != tok.bos_token_id,
    }


def gguf_chat_template(model_dir: Path) -> str | None:
    """The chat template the GGUF file carries: from the model's `prompt_template.json`, with BOS
    in the text as llama.cpp needs it (llama-cpp-python's chat handler and `llama-server --jinja`
    tokenize the rendered chat adding no BOS of their own, and llama.cpp's tokenizer puts the
    dummy-prefix space after BOS itself); else the folder's own Jinja template as it is."""
    if (model_dir / TEMPLATE_FILE).is_file():
        from chinese_vicuna.model.loading import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
        return llama_cpp_chat_template(load_template(str(model_dir / TEMPLATE_FILE), tokenizer))
    return model_chat_template(model_dir)


def model_chat_template(model_dir: Path) -> str | None:
    """The model folder's Jinja chat template (chat_template.jinja, else tokenizer_config.json)."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if (model_dir / "tokenizer_config.json").is_file():
        tpl = read_json(model_dir / "tokenizer_config.json").get("chat_template")
        return tpl if isinstance(tpl, str) else None
    return None


def rope_parameters(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(rope type, its parameters) of a config.json: transformers 5's `rope_parameters`, else the
    older `rope_scaling`."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type")) or "default", rope


def gguf_context_length(config: dict[str, Any]) -> int:
    """`llama.context_length`: the model's window; for dynamic NTK (which llama.cpp does not have,
    see `write_rope_scaling`) the original window, inside which the GGUF computes what HF does."""
    rope_type, rope = rope_parameters(config)
    if rope_type == "dynamic":
        return int(rope.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048))
    return int(config.get("max_position_embeddings", 2048))


def llama3_rope_divisors(rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Llama 3.1's RoPE as llama.cpp runs it: one divisor per rotary pair (`rope_freqs.weight`).

    Llama 3 leaves the pairs that turn more than `high_freq_factor` times within the original
    window as they are, divides the frequency of those turning fewer than `low_freq_factor` times
    by `factor`, and in between blends the two by how many turns the pair makes
    (transformers' `_compute_llama3_parameters`). llama.cpp takes that as frequency / divisor."""
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings") or 8192)
    if not high > low:
        raise UserError(f"rope_parameters: high_freq_factor {high:g} must be greater than low_freq_factor {low:g} for llama3 scaling")
    frequency = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    turns = original * frequency / (2 * np.pi)  # turns of each pair over the original window
    blend = np.clip((turns - low) / (high - low), 0.0, 1.0)  # 0: fully scaled, 1: unchanged
    return (1.0 / ((1.0 - blend) / factor + blend)).astype(np.float32)


def write_rope_scaling(writer: Any, config: dict[str, Any], model_dir: Path, head_dim: int, theta: float) -> np.ndarray | None:
    """llama.cpp's RoPE-scaling keys for the config's scaling, as its own converter writes them;
    returns the `rope_freqs` tensor Llama 3's scaling needs (None for the others).

    - linear: type, factor; yarn: type, factor, original window (and beta_fast/beta_slow when set);
    - llama3: no scaling keys, per-pair divisors in `rope_freqs.weight`;
    - dynamic (NTK): llama.cpp has no equivalent (its NTK settings are static). transformers'
      dynamic scaling is no scaling up to the original window, so the file is written unscaled
      with `context_length` = that window: exact within it, and llama.cpp warns when asked for more."""
    import gguf

    rope_type, rope = rope_parameters(config)
    if rope_type == "default":
        return None
    if rope_type not in ("linear", "yarn", "llama3", "dynamic"):
        raise UserError(
            f"{model_dir}/config.json: rope_type {rope_type!r}: this converter writes linear, yarn, llama3 and dynamic RoPE scaling"
        )
    if rope_type == "dynamic":
        logger.warning(
            "%s/config.json: dynamic NTK RoPE scaling has no llama.cpp equivalent; the GGUF is written without scaling and with "
            "context_length %d (the original window, where dynamic scaling changes nothing). Past it llama.cpp would not "
            "match HF: for a longer context train with --rope_scaling linear or yarn instead",
            model_dir, gguf_context_length(config),
        )  # fmt: skip
        return None
    if rope_type == "llama3":
        return llama3_rope_divisors(rope, head_dim, theta)
    unsupported = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) not in (None, 1, 1.0)]
    if unsupported:
        raise UserError(f"{model_dir}/config.json: rope_parameters {', '.join(unsupported)}: this converter writes plain YaRN only")
    factor = float(rope["factor"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if rope_type == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(factor)
    original = rope.get("original_max_position_embeddings") or int(config.get("max_position_embeddings", 2048) / factor)
    writer.add_rope_scaling_orig_ctx_len(int(original))
    if rope_type == "yarn":
        if rope.get("beta_fast"):
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow"):
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    return None


def write_gguf(model_dir: Path, outfile: Path, float_type: str = "f16") -> None:
    """Write an unquantized (f16 or f32) GGUF file."""
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF files needs the gguf package: pip install -r requirements-llamacpp.txt") from None

    config = read_json(model_dir / "config.json")
    if config.get("model_type") != "llama":
        raise UserError(
            f"{model_dir}/config.json: model_type {config.get('model_type')!r}; this converter writes LLaMA-architecture models"
        )
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    vocab_size = int(config["vocab_size"])
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0

    writer = gguf.GGUFWriter(str(outfile), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(gguf_context_length(config))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(theta))
    rope_freqs = write_rope_scaling(writer, config, model_dir, head_dim, float(theta))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(OUTTYPES[float_type])

    tokens, scores, types = sentencepiece_vocab(model_dir, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    ids = special_ids(model_dir)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unk", writer.add_unk_token_id)):
        if ids[key] is not None:
            add(int(ids[key]))
    if ids["pad"] is not None:
        writer.add_pad_token_id(int(ids["pad"]))
    writer.add_add_bos_token(ids["add_bos"])
    writer.add_add_eos_token(ids["add_eos"])
    chat_template = gguf_chat_template(model_dir)
    if chat_template:
        writer.add_chat_template(chat_template)  # tokenizer.chat_template: llama.cpp, Ollama, LM Studio
    if (model_dir / TEMPLATE_FILE).is_file():
        writer.add_string(GGUF_TEMPLATE_KEY, (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8"))
    # How the HF tokenizer begins text where llama.cpp's cannot tell (after a special token, at a
    # leading space), so tools/cpu_chat.py and serve.py --engine llamacpp build HF's ids
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    writer.add_bool(GGUF_RESTARTS_KEY, restarts_after_special(hf_tokenizer))
    writer.add_bool(GGUF_FOLDS_SPACE_KEY, folds_leading_space(hf_tokenizer))

    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)  # llama.cpp divides each pair's frequency by it
    index = TensorIndex(model_dir)
    float_dtype = np.float16 if float_type == "f16" else np.float32
    for name in sorted(index.shapes, key=_order):
        target = gguf_name(name)
        if target is None:
            continue
        t = index.get(name).float()
        if name.endswith("self_attn.q_proj.weight"):
            t = unpermute_qk(t, n_heads)  # HF's rotary halves → llama.cpp's interleaved pairs
        elif name.endswith("self_attn.k_proj.weight"):
            t = unpermute_qk(t, n_kv)
        array = t.numpy()
        writer.add_tensor(target, array.astype(float_dtype) if array.ndim == 2 else array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if parts[:2] == ["model", "layers"] else -1 if "embed" in name else 10**9, name)


def quantize(infile: Path, outfile: Path, outtype: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--outtype {outtype} needs llama-cpp-python: pip install -r requirements-llamacpp.txt (it compiles llama.cpp)"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = OUTTYPES[outtype]
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(infile).encode(), str(outfile).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {infile} to {outtype} (code {rc})")


def convert(model_dir: str | os.PathLike, outfile: str | os.PathLike, outtype: str = "f16") -> Path:
    """MODEL_DIR → OUTFILE; written beside it under a temporary name, then renamed (atomic)."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json; give a merged Hugging Face model folder (merge_lora.py --output_type hf)")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=outfile.parent, prefix=f".{outfile.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if outtype in ("f16", "f32"):
            write_gguf(model_dir, tmp, outtype)
        else:
            f16 = tmp.with_suffix(".f16.tmp")
            try:
                write_gguf(model_dir, f16, "f16")
                quantize(f16, tmp, outtype)
            finally:
                f16.unlink(missing_ok=True)
        make_readable(tmp)  # mkstemp made it 0600
        os.replace(tmp, outfile)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%s, %.1f MB)", outfile, outtype, outfile.stat().st_size / 1e6)
    return outfile

"""Meta (`consolidated.NN.pth` + `params.json`) checkpoints: to and from Hugging Face tensors."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError
from chinese_vicuna.export.names import HF_TO_META, META_SPLIT_DIM, META_TOP, meta_module, permute_qk, unpermute_qk
from chinese_vicuna.files import read_json, write_json

# Meta's model-parallel degree by hidden size (7B, 13B, 33B, 65B/70B).
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


def meta_params(config: dict[str, Any]) -> dict[str, Any]:
    """params.json whose FFN formula (Meta's model.py) reproduces intermediate_size exactly."""
    dim, hidden = int(config["hidden_size"]), int(config["intermediate_size"])
    params: dict[str, Any] = {
        "dim": dim,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": int(config["num_attention_heads"]),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "vocab_size": int(config["vocab_size"]),
    }
    n_kv = config.get("num_key_value_heads")
    if n_kv and int(n_kv) != params["n_heads"]:
        params["n_kv_heads"] = int(n_kv)
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if theta and float(theta) != 10000.0:
        params["rope_theta"] = float(theta)
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(dim, multiple_of, None) == hidden:
            params["multiple_of"] = multiple_of
            break
    else:
        # LLaMA-2 70B: multiple_of 4096 and ffn_dim_multiplier 1.3 give 28672; prefer the short
        # multiplier Meta wrote over the exact ratio when both reproduce the size
        multiple_of = math.gcd(hidden, 4096)
        ratio = hidden / base
        for multiplier in (round(ratio, 1), round(ratio, 2), round(ratio, 3), ratio):
            if meta_ffn_dim(dim, multiple_of, multiplier) == hidden:
                break
        else:
            raise UserError(f"intermediate_size {hidden} cannot be written as Meta's params.json (dim {dim})")
        params["multiple_of"], params["ffn_dim_multiplier"] = multiple_of, multiplier
    return dict(sorted(params.items()))


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_num_shards(config: dict[str, Any]) -> int:
    return META_SHARDS_BY_DIM.get(int(config["hidden_size"]), 1)


def hf_to_meta(state: dict[str, torch.Tensor], config: dict[str, Any], num_shards: int = 1) -> list[dict[str, torch.Tensor]]:
    """HF LlamaForCausalLM tensors → Meta key names, q/k unpermuted, split into `num_shards`."""
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    meta: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in META_TOP:
            meta[META_TOP[name]] = t
        elif name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module not in HF_TO_META:
                continue  # e.g. rotary_emb.inv_freq buffers of old checkpoints
            if module == "self_attn.q_proj":
                t = unpermute_qk(t, n_heads)
            elif module == "self_attn.k_proj":
                t = unpermute_qk(t, n_kv)
            meta[f"layers.{layer}.{HF_TO_META[module]}.weight"] = t
    if "output.weight" not in meta:  # tied embeddings: Meta's format always has its own output
        meta["output.weight"] = meta["tok_embeddings.weight"]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, t in meta.items():
        dim = META_SPLIT_DIM.get(meta_module(name))
        if dim is None or num_shards == 1:
            for shard in shards:
                shard[name] = t.clone()
        else:
            for shard, piece in zip(shards, t.split(split_sizes(name, t.shape[dim], num_shards), dim=dim), strict=True):
                shard[name] = piece.clone()
    return shards


def split_sizes(name: str, size: int, num_shards: int) -> list[int]:
    """Sizes of the shard pieces of a `size`-long dimension: equal; for a vocabulary that does not
    divide (Chinese-LLaMA's 49953 rows over 13B's 2 shards) the last shard takes the remainder,
    as Chinese-LLaMA-Alpaca's merge script splits `output.weight` ([24976, 24977])."""
    if size % num_shards == 0:
        return [size // num_shards] * num_shards
    if name != "output.weight":
        raise UserError(f"{name}: dimension {size} does not split into {num_shards} shards; pass --num_shards 1")
    sizes = [size // num_shards] * num_shards
    sizes[-1] += size % num_shards
    return sizes


def meta_to_hf(shards: list[dict[str, torch.Tensor]], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta's consolidated shards → HF tensor names and q/k layout (the inverse of hf_to_meta)."""
    n_heads = int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads", n_heads))
    inverse = {v: k for k, v in HF_TO_META.items()}
    top = {v: k for k, v in META_TOP.items()}
    hf: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        dim = META_SPLIT_DIM.get(meta_module(name))
        t = shards[0][name] if dim is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim=dim)
        if name in top:
            hf[top[name]] = t
        else:
            _, layer, rest = name.split(".", 2)
            module = inverse[rest.rsplit(".", 1)[0]]
            if module == "self_attn.q_proj":
                t = permute_qk(t, n_heads)
            elif module == "self_attn.k_proj":
                t = permute_qk(t, n_kv)
            hf[f"model.layers.{layer}.{module}.weight"] = t
    return hf


def save_meta(state: dict[str, torch.Tensor], config: dict[str, Any], out: Path, num_shards: int | None = None) -> list[Path]:
    """consolidated.NN.pth + params.json, sharded by model size as Meta's checkpoints are."""
    n = num_shards or meta_num_shards(config)
    written = []
    for i, shard in enumerate(hf_to_meta(state, config, n)):
        path = out / f"consolidated.{i:02d}.pth"
        torch.save(shard, path)
        written.append(path)
    write_json(out / "params.json", meta_params(config))
    return written


def meta_shard_paths(folder: str | os.PathLike) -> list[Path]:
    paths = sorted(Path(folder).glob("consolidated.*.pth"))
    if not paths:
        raise UserError(f"{folder}: no consolidated.NN.pth files (a Meta checkpoint folder has consolidated.00.pth and params.json)")
    return paths


def load_meta(folder: str | os.PathLike, mmap: bool = False) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The shards (weights only, no code runs) and params.json. With `mmap`, tensors stay on disk
    until read: converting touches one tensor of every shard at a time."""
    folder = Path(folder)
    if not (folder / "params.json").is_file():
        raise UserError(f"{folder}: no params.json beside the consolidated.NN.pth files")
    shards = []
    for p in meta_shard_paths(folder):
        try:
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=mmap))
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            shards.append(torch.load(p, map_location="cpu", weights_only=True))
    return shards, read_json(folder / "params.json")


def hf_config_from_params(params: dict[str, Any], vocab_size: int, max_position_embeddings: int, dtype: str) -> dict[str, Any]:
    """config.json of the HF LlamaForCausalLM for Meta's params.json (`vocab_size` from the
    embedding: LLaMA-1's params.json says -1)."""
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": meta_ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        "num_hidden_layers": int(params["n_layers"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or n_heads),
        "rms_norm_eps": float(params.get("norm_eps", 1e-6)),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,
    }
    return config


def iter_meta_as_hf(shards: list[dict[str, torch.Tensor]], params: dict[str, Any]) -> Any:
    """(HF name, tensor) one at a time (`meta_to_hf` without holding the whole model)."""
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        yield from meta_to_hf([{name: s[name]} for s in shards], params).items()

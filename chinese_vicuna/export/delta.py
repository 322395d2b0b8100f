"""Delta weights (target - base) to publish a model without the base's weights, and applying them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError
from chinese_vicuna.export.tensors import (
    DELTA_MANIFEST,
    ShardWriter,
    StagingDir,
    TensorIndex,
    copy_side_files,
    tensor_sha256,
    write_manifest,
)
from chinese_vicuna.files import read_json, write_json


def _delta_of(target: torch.Tensor, base: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The smallest-precision delta whose `(base + delta).to(target dtype)` is bit-exact.

    fp16/bf16 weights: a float32 difference is nearly always exact; where it is not (values
    of very different magnitude), float64; if even that rounds, the target itself ("copy").
    Elementwise CPU arithmetic is deterministic, so apply_delta repeats exactly this check.
    """
    for dtype in (torch.float32, torch.float64):
        delta = target.to(dtype) - base.to(dtype)
        if torch.equal((base.to(dtype) + delta).to(target.dtype), target):
            return "add", delta
    return "copy", target


def _padded(base: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The base grown with zero rows to a resized target's shape (an expanded vocabulary)."""
    if tuple(base.shape) == tuple(shape):
        return base
    if base.dim() != len(shape) or any(b > s for b, s in zip(base.shape, shape, strict=True)):
        raise UserError(f"cannot make a delta between shapes {tuple(base.shape)} and {shape}")
    out = torch.zeros(shape, dtype=base.dtype)
    out[tuple(slice(0, n) for n in base.shape)] = base
    return out


def make_delta(
    base_dir: str | os.PathLike, target_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_size: int = 5 * 10**9
) -> Path:
    """delta = target − base, tensor by tensor (bounded memory); non-weight files of the target copied."""
    from tqdm import tqdm

    base, target = TensorIndex(base_dir, "base model"), TensorIndex(target_dir, "target model")
    with StagingDir(out_dir) as stage:
        writer = ShardWriter(stage.path, max_shard_size, prefix="delta")
        entries: dict[str, dict[str, Any]] = {}
        for _, names in tqdm(list(target.iter_files()), desc="delta shards"):
            for name in names:
                t = target.get(name)
                entry = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "target_sha256": tensor_sha256(t)}
                if name in base.shapes and t.is_floating_point():
                    b = base.get(name)
                    entry["base_sha256"] = tensor_sha256(b)
                    entry["base_shape"] = list(b.shape)
                    entry["mode"], stored = _delta_of(t, _padded(b, tuple(t.shape)))
                else:
                    entry["mode"], stored = "copy", t
                writer.add(name, stored)
                entries[name] = entry
        writer.finish()
        copy_side_files(Path(target_dir), stage.path)
        modes = [e["mode"] for e in entries.values()]
        write_json(
            stage.path / DELTA_MANIFEST, {"base": str(base_dir), "counts": {m: modes.count(m) for m in set(modes)}, "tensors": entries}
        )
        write_manifest(stage.path, {"kind": "delta", "base": str(base_dir), "target": str(target_dir)})
    return Path(out_dir)


def apply_delta(
    base_dir: str | os.PathLike, delta_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_size: int = 5 * 10**9
) -> Path:
    """target = base + delta, tensor by tensor; every base tensor and every result checked by SHA-256."""
    from tqdm import tqdm

    delta_dir = Path(delta_dir)
    spec = read_json(delta_dir / DELTA_MANIFEST)["tensors"]
    base, delta = TensorIndex(base_dir, "base model"), TensorIndex(delta_dir, "delta")
    with StagingDir(out_dir) as stage:
        writer = ShardWriter(stage.path, max_shard_size)
        for _, names in tqdm(list(delta.iter_files()), desc="apply shards"):
            for name in names:
                entry, d = spec[name], delta.get(name)
                if entry["mode"] == "copy":
                    t = d
                else:
                    if name not in base.shapes:
                        raise UserError(
                            f"{base_dir}: has no tensor {name}; this delta needs the base it was made from ({read_json(delta_dir / DELTA_MANIFEST)['base']})"
                        )
                    b = base.get(name)
                    if tensor_sha256(b) != entry["base_sha256"]:
                        raise UserError(
                            f"{base_dir}: tensor {name} differs from the base this delta was made from: use the exact original base weights"
                        )
                    dtype = getattr(torch, entry["dtype"])
                    b = _padded(b, tuple(entry["shape"]))
                    t = (b.to(d.dtype) + d).to(dtype)
                if tensor_sha256(t) != entry["target_sha256"]:
                    raise UserError(f"{delta_dir}: {name} does not reproduce the target (SHA-256 differs); the delta files are damaged")
                writer.add(name, t)
        writer.finish()
        copy_side_files(delta_dir, stage.path)
        write_manifest(stage.path, {"kind": "base+delta", "base": str(base_dir), "delta": str(delta_dir)})
    return Path(out_dir)

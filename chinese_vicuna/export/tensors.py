"""Tensor files for export: staging folders committed by rename, safetensors shards, manifests, checksums."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.devices import DTYPES
from chinese_vicuna.errors import UserError
from chinese_vicuna.files import follow_umask, make_readable, read_json, write_json
from chinese_vicuna.outputlock import OutputLock

DELTA_MANIFEST = "delta_manifest.json"  # written by export/delta.py; named here so tensors.py needs no import of it
SAFE_INDEX = "model.safetensors.index.json"

logger = logging.getLogger(__name__)


DELTA_MANIFEST = "delta_manifest.json"  # export/delta.py's list of tensors and how each was stored
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# config.json's names of the dtypes (as transformers writes them)
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES.values()}


def parse_size(value: str | int) -> int:
    """`5GB`, `500MB`, `10KB` or a byte count → bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", value.upper())
    if not m:
        raise UserError(f"--max_shard_size {value!r}: use a size like 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


def split_list(value: str) -> list[str]:
    """`A,B` → ["A", "B"] (the order of application)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError("--lora_weights is empty; give one adapter folder or a comma list A,B applied in that order")
    return items


def resolve_dtype(name: str, config: dict[str, Any]) -> torch.dtype:
    """`auto`: the base's own dtype (config.json), fp32 when it says nothing."""
    if name == "auto":
        stored = config.get("dtype") or config.get("torch_dtype") or "float32"
        return {name: dtype for dtype, name in DTYPE_NAMES.items()}.get(stored, torch.float32)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def write_manifest(out_dir: Path, info: dict[str, Any] | None = None) -> Path:
    """`manifest.json`: SHA-256 and size of every file written in `out_dir`, plus provenance."""
    files = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")):
        files[str(path.relative_to(out_dir))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = out_dir / "manifest.json"
    write_json(manifest, {**(info or {}), "files": files})
    return manifest


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")


class StagingDir:
    """Write a model into a staging folder beside `out`, then swap it in with renames.

    `.{name}.partial-*` (the new model, until complete) and `.{name}.old-*` (the model it
    replaces, during the swap) sit beside `out` on the same file system, so each step is one
    rename: old → `.old-*`, new → `out`, then the old one is removed. A kill at any point
    leaves either the old model or the new one at `out` (or the old one in `.old-*`, which the
    next run puts back); the next run removes the leftovers of killed runs and says so.
    The output lock (`chinese_vicuna/outputlock.py`: `.{name}.lock`, released by the kernel when a writer
    dies) keeps two runs from writing the same `out`, and one run from removing the staging folder of
    another that is alive.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        self.out = Path(out_dir).absolute()
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--output_dir {self.out}: exists and is not a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock: OutputLock | None = OutputLock(self.out)
        try:
            self._prepare(overwrite)
        except BaseException:
            self._unlock()
            raise

    def _prepare(self, overwrite: bool) -> None:
        clean_leftovers(self.out)
        held = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []  # hidden ones too: all is replaced
        weights = [n for n in held if n.endswith(WEIGHT_SUFFIXES)]
        if weights and not overwrite:
            raise UserError(f"--output_dir {self.out}: already holds weights ({weights[0]}, ...); pick an empty folder or pass --overwrite")
        if held and not overwrite:
            # the whole folder is replaced: never delete files the user put there without being told to
            raise UserError(
                f"--output_dir {self.out}: holds other files ({held[0]}, ...); pick an empty or new folder, or pass --overwrite"
            )
        self.path = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.partial-"))
        make_readable(self.path, directory=True)  # mkdtemp's 0700 would become the model folder's mode

    def commit(self) -> None:
        try:
            follow_umask(self.path)  # safetensors writes its files 0600
            old = None
            if self.out.exists():
                old = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.old-"))
                os.replace(self.out, old)  # over the empty placeholder folder: one rename
            try:
                os.rename(self.path, self.out)
            except BaseException:
                if old is not None:
                    os.rename(old, self.out)  # put the old model back before anything else
                self.abort()
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            self._unlock()

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed runs left beside `out` (`.partial-*` staging folders, `.old-*` models
    being replaced; `out/.partial-*` of older versions) and log each; returns what was removed.
    A run killed between its two renames left no `out`: its `.old-*` model is put back, never lost."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.rename(olds.pop(), out)
        logger.warning("%s: put back the model an interrupted run was replacing", out)
    partials = [*out.parent.glob(f".{out.name}.partial-*"), *(out.glob(".partial-*") if out.is_dir() else [])]
    removed = [*olds, *partials]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted run", path)
    return removed


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer and other small files; not weights, indexes or manifests."""
    for item in Path(src).iterdir():
        weights = item.suffix in (".safetensors", ".bin", ".pth") or item.name.endswith(".index.json")
        if item.is_file() and not weights and item.name not in ("manifest.json", DELTA_MANIFEST):
            shutil.copyfile(item, dst / item.name)


class TensorIndex:
    """Names, shapes and files of a model folder's safetensors weights; tensors read one at a time."""

    def __init__(self, model_dir: str | os.PathLike, what: str = "model") -> None:
        from safetensors import safe_open

        from chinese_vicuna.model.loading import check_safetensors

        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise UserError(f"{self.dir}: {what} folder not found")
        index = self.dir / SAFE_INDEX
        if index.is_file():
            names = sorted(set(read_json(index)["weight_map"].values()))
            self.files = [self.dir / n for n in names]
        else:
            self.files = sorted(self.dir.glob("*.safetensors"))
        if not self.files:
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            hint = " (it has pytorch_model*.bin: load and save it once with save_pretrained(safe_serialization=True))" if bins else ""
            raise UserError(f"{self.dir}: no *.safetensors weights{hint}")
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in self.files:
            if not path.is_file():
                raise UserError(f"{index}: lists {path.name}, which is missing")
            check_safetensors(path)  # truncated: one line naming the file
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(name)
                    self.location[name] = path
                    self.shapes[name] = tuple(sl.get_shape())
                    self.dtypes[name] = sl.get_dtype()
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.location[name]
        if path not in self._open:
            self._open = {path: safe_open(str(path), "pt")}  # keep one file open: bounded memory
        return self._open[path].get_tensor(name)

    def iter_files(self) -> Iterator[tuple[Path, list[str]]]:
        for path in self.files:
            yield path, [n for n, p in self.location.items() if p == path]


class ShardWriter:
    """Safetensors shards of at most `max_shard_size` bytes, named and indexed as HF does."""

    def __init__(self, out_dir: Path, max_shard_size: int, prefix: str = "model") -> None:
        self.out, self.max, self.prefix = out_dir, max_shard_size, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f".{self.prefix}-part{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Rename parts to `model-0000i-of-0000n.safetensors` (or `model.safetensors`) + index."""
        self.flush()
        n = len(self.written)
        weight_map, final = {}, []
        for i, (path, names) in enumerate(self.written, 1):
            name = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            final.append(self.out / name)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            write_json(
                self.out / f"{self.prefix}.safetensors.index.json", {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            )
        return final

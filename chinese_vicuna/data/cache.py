"""The tokenized-data cache: memory-mapped stores (data/store.py) keyed by the data bytes, tokenizer,
template and settings; written atomically, checked before every use."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chinese_vicuna.data.store import StoreWriter, TokenizedDataset, check_store, publish
from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)


# Bump when the tokenized form changes, so old caches are not reused.
# 2: memory-mapped stores (data/store.py); 3: later segments encoded as continuations;
# 4: special-token text in data kept as text, stricter record validation, file types in the key
# 5: the text after a special token restarts where the tokenizer restarts there ("legacy": true)
CACHE_FORMAT_VERSION = "5"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CHINESE_VICUNA_CACHE", Path.home() / ".cache" / "chinese_vicuna")) / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = [
        type(tokenizer).__name__,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer("测试 test", add_special_tokens=False)["input_ids"],
        # the same vocabulary with and without `"legacy": true` differs only after a special token
        tokenizer(f"{tokenizer.eos_token or ''}test", add_special_tokens=False)["input_ids"],
    ]
    return hashlib.sha256((vocab + json.dumps(extra)).encode()).hexdigest()


def cache_key(data_files: Sequence[str | os.PathLike], tokenizer: Any, settings: dict[str, Any]) -> str:
    """A key that changes when the data bytes, the files' types, tokenizer, template or settings change.

    A file's type (its suffix) decides how its bytes are read: the same bytes as `.jsonl` and
    as `.json` are different data (the second an error), so a cache hit never stands in for a
    check that would fail. Each file's size is hashed before its bytes (no two file lists collide)."""
    h = hashlib.sha256()
    h.update(CACHE_FORMAT_VERSION.encode())
    for path in map(Path, data_files):
        try:
            with path.open("rb") as f:  # in pieces: a data file may be larger than memory
                h.update(f"\0{path.suffix}\0{os.fstat(f.fileno()).st_size}\0".encode())
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            raise UserError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions") from None
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def build_or_load(
    name: str,
    files: Sequence[str | os.PathLike],
    tokenizer: Any,
    settings: dict[str, Any],
    build: Callable[[StoreWriter], None],
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    labels_are_input_ids: bool = False,
) -> TokenizedDataset:
    """The samples `build(writer)` writes, as a memory-mapped dataset; from the cache while the
    files, tokenizer and settings are unchanged (a damaged cache entry is rebuilt).

    A store is written into a private temporary folder and renamed into place when complete,
    so other processes (ranks, other runs) see either nothing or the whole of it.
    """
    if not use_cache:
        tmp = Path(tempfile.mkdtemp(prefix="chinese_vicuna-tokenized-"))
        # Removed when this process ends (kept until then: a spawned DataLoader worker reopens it).
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _write(tmp, build, labels_are_input_ids)
        return TokenizedDataset(tmp)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / cache_key(files, tokenizer, settings)
    if folder.is_dir():
        problem = check_store(folder)
        if problem is None:
            dataset = TokenizedDataset(folder)
            logger.info("%s: %d tokenized samples loaded from cache %s", name, len(dataset), folder)
            return dataset
        logger.warning("%s: the cache folder %s is damaged (%s); tokenizing again", name, folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=root))
    try:
        _write(tmp, build, labels_are_input_ids)
        publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return TokenizedDataset(folder)


def _write(folder: Path, build: Callable[[StoreWriter], None], labels_are_input_ids: bool) -> None:
    writer = StoreWriter(folder, labels_are_input_ids)
    try:
        build(writer)
    finally:
        writer.close()

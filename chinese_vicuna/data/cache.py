"""The tokenized-data cache: keyed by the data bytes, tokenizer, template and settings; written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chinese_vicuna.data.encode import gc_paused
from chinese_vicuna.files import atomic_write_text

logger = logging.getLogger(__name__)


# Bump when the tokenized form changes, so old caches are not reused.
CACHE_FORMAT_VERSION = "2"  # 2: later segments encoded as continuations (no dummy-prefix token)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CHINESE_VICUNA_CACHE", Path.home() / ".cache" / "chinese_vicuna")) / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = [
        type(tokenizer).__name__,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer("测试 test", add_special_tokens=False)["input_ids"],
    ]
    return hashlib.sha256((vocab + json.dumps(extra)).encode()).hexdigest()


def cache_key(data_files: Sequence[str | os.PathLike], tokenizer: Any, settings: dict[str, Any]) -> str:
    """A key that changes when the data bytes, tokenizer, template or settings change."""
    h = hashlib.sha256()
    h.update(CACHE_FORMAT_VERSION.encode())
    for path in data_files:
        h.update(Path(path).read_bytes())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def cached_samples(
    key: str,
    build: Callable[[], list[dict[str, list[int]]]],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[dict[str, list[int]]], bool]:
    """Samples from the cache, or built and written atomically. Returns (samples, from_cache)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"{key}.jsonl"
    if path.is_file():
        with path.open(encoding="utf-8") as f, gc_paused():
            return [json.loads(line) for line in f], True
    samples = build()
    atomic_write_text(path, "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in samples))
    return samples, False


def build_or_load(
    name: str,
    files: Sequence[str | os.PathLike],
    tokenizer: Any,
    settings: dict[str, Any],
    build: Callable[[], list[dict[str, list[int]]]],
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> list[dict[str, list[int]]]:
    """`build()`, or its earlier result from the cache while files, tokenizer and settings are unchanged."""
    if not use_cache:
        return build()
    samples, hit = cached_samples(cache_key(files, tokenizer, settings), build, cache_dir)
    if hit:
        logger.info("%s: %d tokenized samples loaded from cache", name, len(samples))
    return samples

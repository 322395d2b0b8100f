"""Plain text for continued pretraining: .txt files → token ids → fixed-size blocks.

Each non-empty line is a document, encoded as `[bos] ids [eos]`; the documents are concatenated
and cut into `block_size` blocks (the remainder that does not fill a block is dropped and
counted), as in Chinese-LLaMA's run_clm_pt. The blocks are cached on disk by a key of the file
bytes, the tokenizer and the settings, and reused by the next run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from chinese_vicuna.data import cache_key, cached_samples, encode_texts
from chinese_vicuna.errors import UserError
from chinese_vicuna.vocab import read_text_lines

logger = logging.getLogger(__name__)


def text_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """The `.txt` files of a folder (sorted), or one `.txt` file."""
    path = Path(dataset_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--dataset_dir {path}: folder not found")
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise UserError(f"--dataset_dir {path}: the folder has no .txt files (plain UTF-8 text, one paragraph per line)")
    return files


def encode_documents(tokenizer: Any, documents: Sequence[str], batch_size: int = 1000) -> list[list[int]]:
    """`[bos] + ids + [eos]` of every document, tokenized in batches."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[list[int]] = []
    for start in range(0, len(documents), batch_size):
        out.extend(bos + ids + eos for ids in encode_texts(tokenizer, documents[start : start + batch_size]))
    return out


def group_into_blocks(token_lists: Iterable[Sequence[int]], block_size: int) -> tuple[list[list[int]], int]:
    """Concatenate and cut into `block_size` blocks; returns (blocks, tokens dropped at the end)."""
    if block_size < 2:
        raise UserError(f"--block_size {block_size}: must be at least 2")
    blocks: list[list[int]] = []
    current: list[int] = []
    for ids in token_lists:
        current.extend(ids)
        while len(current) >= block_size:
            blocks.append(current[:block_size])
            current = current[block_size:]
    return blocks, len(current)


def load_pretrain_dataset(
    dataset_dir: str | os.PathLike,
    tokenizer: Any,
    block_size: int,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> list[dict[str, list[int]]]:
    """Blocks as training samples (labels = input_ids: every token is trained), cached on disk."""
    files = text_files(dataset_dir)

    def build() -> list[dict[str, list[int]]]:
        documents = read_text_lines(files)
        blocks, dropped = group_into_blocks(encode_documents(tokenizer, documents), block_size)
        logger.info(
            "%s: %d files, %d paragraphs → %d blocks of %d tokens; %d tokens at the end dropped",
            dataset_dir,
            len(files),
            len(documents),
            len(blocks),
            block_size,
            dropped,
        )
        return [{"input_ids": b, "labels": b} for b in blocks]

    if use_cache:
        samples, hit = cached_samples(cache_key(files, tokenizer, {"kind": "pretrain", "block_size": block_size}), build, cache_dir)
        if hit:
            logger.info("%s: %d blocks loaded from the cache", dataset_dir, len(samples))
    else:
        samples = build()
    if not samples:
        raise UserError(f"--dataset_dir {dataset_dir}: the text is shorter than one block of {block_size} tokens; lower --block_size")
    return samples

"""Datasets of the training stages: instruction, chat and pretraining samples (read, validate,
tokenize or load from the cache), and the seeded train/validation split.

Every loader returns a `TokenizedDataset` (data/store.py): samples memory-mapped from a store
folder, written once by the main process in batches (records are streamed from `.jsonl` files)
and read by index by every process. A new stage's loader (its own module in data/) builds on
`load_tokenized` and `template_settings` the same way; groups of sequences (pairs) are read
through `store.SequenceGroups`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from chinese_vicuna.data.cache import build_or_load
from chinese_vicuna.data.chat import CHAT_DATA_VERSION, tokenize_conversations
from chinese_vicuna.data.encode import TokenizeStats, instruction_batches
from chinese_vicuna.data.formats import read_conversations
from chinese_vicuna.data.pretrain import TextBlocks
from chinese_vicuna.data.records import data_files, iter_records, validate_instruction
from chinese_vicuna.data.store import SequenceGroups, StoreWriter, TokenizedDataset
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import PromptTemplate

logger = logging.getLogger(__name__)


def load_chat_dataset(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    train_on_last_turn_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedDataset:
    """Read, validate, split and tokenize (or load from the cache) chat data files.

    The conversations of all files are read and tokenized in memory (then stored and mapped)."""
    files = data_files(data_path)

    def build(writer: StoreWriter) -> None:
        stats = TokenizeStats()
        conversations = [c for path in files for c in read_conversations(path, stats)]
        writer.add_samples(
            tokenize_conversations(conversations, tokenizer, template, cutoff_len, train_on_inputs, train_on_last_turn_only, stats)
        )
        stats.log(str(data_path))

    settings = {
        "kind": "chat",
        "version": CHAT_DATA_VERSION,
        **template_settings(template, tokenizer),
        "cutoff_len": cutoff_len,
        "train_on_inputs": train_on_inputs,
        "train_on_last_turn_only": train_on_last_turn_only,
    }
    return load_tokenized(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)


def load_instruction_dataset(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedDataset:
    """Read, validate, tokenize (or load from cache) an alpaca-format file or a folder of them.

    Records are read, validated, tokenized and written to the store a batch at a time."""
    files = data_files(data_path)

    def build(writer: StoreWriter) -> None:
        records = (validate_instruction(r) for path in files for r in iter_records(path))
        stats = TokenizeStats()
        for samples in instruction_batches(
            _progress(records, str(data_path), "records"), tokenizer, template, cutoff_len, train_on_inputs, stats
        ):
            writer.add_samples(samples)
        stats.log(str(data_path))

    settings = {"kind": "instruct", **template_settings(template, tokenizer), "cutoff_len": cutoff_len, "train_on_inputs": train_on_inputs}
    return load_tokenized(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)


Samples = TypeVar("Samples", TokenizedDataset, SequenceGroups, list)


def split_train_val(samples: Samples, val_set_size: int, seed: int = 42) -> tuple[Samples, Samples]:
    """A seeded random hold-out of `val_set_size` samples (0: no validation set); a store view
    (TokenizedDataset, SequenceGroups) is split into two views by index (no sample is read)."""
    if val_set_size <= 0:
        return samples, samples[:0] if isinstance(samples, list) else samples.select([])
    if val_set_size >= len(samples):
        raise UserError(f"--val_set_size {val_set_size} leaves no training data ({len(samples)} samples); lower it or pass 0")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_set_size], order[val_set_size:].sort().values
    if hasattr(samples, "select"):
        return samples.select(train_idx.numpy()), samples.select(val_idx.numpy())
    return [samples[i] for i in train_idx.tolist()], [samples[i] for i in val_idx.tolist()]


def load_pretrain_dataset(
    dataset_dir: str | os.PathLike,
    tokenizer: Any,
    block_size: int,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedDataset:
    """Blocks as training samples (labels = input_ids: every token is trained), cached on disk.

    The text is read and tokenized a batch of lines at a time and the blocks written to the
    store as they complete: the corpus may be larger than memory (its blocks must fit on disk)."""
    files = pretrain_files(dataset_dir)

    def build(writer: StoreWriter) -> None:
        text_blocks = TextBlocks(tokenizer, files, block_size)
        for blocks in _progress(text_blocks, str(dataset_dir), "blocks", len):
            writer.add_arrays(blocks.reshape(-1), [block_size] * len(blocks))
        logger.info(
            "%s: %d files, %d paragraphs → %d blocks of %d tokens; %d tokens at the end dropped",
            dataset_dir,
            len(files),
            text_blocks.documents,
            len(writer),
            block_size,
            text_blocks.dropped,
        )

    settings = {"kind": "pretrain", "block_size": block_size}
    return load_tokenized(
        f"--dataset_dir {dataset_dir}", files, tokenizer, settings, build, cache_dir, use_cache,
        "the text is shorter than one block; lower --block_size", labels_are_input_ids=True,
    )  # fmt: skip


def pretrain_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """The .txt and .jsonl ({"text": ...} per line) files of a pretraining corpus (a folder, or one file)."""
    return data_files(dataset_dir, (".txt", ".jsonl"), "--dataset_dir")


T = TypeVar("T")


def _progress(items: Iterable[T], name: str, unit: str, count: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
    """`items`, with a progress bar (units per second) on a terminal and a rate in the log at the end."""
    start = time.perf_counter()
    done = 0
    with tqdm(desc=f"tokenizing {name}", unit=f" {unit}", unit_scale=True, mininterval=1.0, disable=None) as bar:
        for item in items:
            n = count(item)
            done += n
            bar.update(n)
            yield item
    seconds = time.perf_counter() - start
    logger.info("%s: %d %s tokenized in %.1f s (%.0f %s/s)", name, done, unit, seconds, done / max(seconds, 1e-9), unit)


def template_settings(template: PromptTemplate, tokenizer: Any) -> dict[str, Any]:
    """What of a template shapes the samples (part of the cache key); `auto` is the tokenizer's chat_template."""
    return {
        "template": template.name,
        "spec": template.spec,
        "chat_template": getattr(tokenizer, "chat_template", None) if template.is_auto else None,
    }


def load_tokenized(
    name: str,
    files: list[Path],
    tokenizer: Any,
    settings: dict[str, Any],
    build: Callable[[StoreWriter], None],
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    empty_hint: str = "no sample has a trainable token left after truncation; raise --cutoff_len",
    labels_are_input_ids: bool = False,
) -> TokenizedDataset:
    """`build(writer)`'s samples, or their cached store; an empty result is a UserError."""
    samples = build_or_load(name, files, tokenizer, settings, build, cache_dir, use_cache, labels_are_input_ids)
    if not samples:
        raise UserError(f"{name}: {empty_hint}")
    return samples

"""Datasets of the training stages: instruction, chat and pretraining samples (read, validate,
tokenize or load from the cache), and the seeded train/validation split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.data.cache import build_or_load
from chinese_vicuna.data.chat import CHAT_DATA_VERSION, tokenize_conversations
from chinese_vicuna.data.encode import TokenizeStats, tokenize_instructions
from chinese_vicuna.data.formats import read_conversations
from chinese_vicuna.data.pretrain import encode_documents, group_into_blocks
from chinese_vicuna.data.records import data_files, read_records, read_text_lines, validate_instruction
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
) -> list[dict[str, list[int]]]:
    """Read, validate, split and tokenize (or load from the cache) chat data files."""
    files = data_files(data_path)

    def build() -> list[dict[str, list[int]]]:
        stats = TokenizeStats()
        conversations = [c for path in files for c in read_conversations(path, stats)]
        samples = tokenize_conversations(conversations, tokenizer, template, cutoff_len, train_on_inputs, train_on_last_turn_only, stats)
        stats.log(str(data_path))
        return samples

    settings = {
        "kind": "chat",
        "version": CHAT_DATA_VERSION,
        **_template_settings(template, tokenizer),
        "cutoff_len": cutoff_len,
        "train_on_inputs": train_on_inputs,
        "train_on_last_turn_only": train_on_last_turn_only,
    }
    return _load(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)


def load_instruction_dataset(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> list[dict[str, list[int]]]:
    """Read, validate, tokenize (or load from cache) an alpaca-format file or a folder of them."""
    files = data_files(data_path)

    def build() -> list[dict[str, list[int]]]:
        records = [validate_instruction(r) for path in files for r in read_records(path)]
        stats = TokenizeStats()
        samples = tokenize_instructions(records, tokenizer, template, cutoff_len, train_on_inputs, stats)
        stats.log(str(data_path))
        return samples

    settings = {"kind": "instruct", **_template_settings(template, tokenizer), "cutoff_len": cutoff_len, "train_on_inputs": train_on_inputs}
    return _load(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)


def split_train_val(samples: list[dict[str, Any]], val_set_size: int, seed: int = 42) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded random hold-out of `val_set_size` samples (0: no validation set)."""
    if val_set_size <= 0:
        return samples, []
    if val_set_size >= len(samples):
        raise UserError(f"--val_set_size {val_set_size} leaves no training data ({len(samples)} samples); lower it or pass 0")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [samples[i] for i in order[:val_set_size]]
    train = [samples[i] for i in sorted(order[val_set_size:])]
    return train, val


def load_pretrain_dataset(
    dataset_dir: str | os.PathLike,
    tokenizer: Any,
    block_size: int,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> list[dict[str, list[int]]]:
    """Blocks as training samples (labels = input_ids: every token is trained), cached on disk."""
    files = data_files(dataset_dir, (".txt",), "--dataset_dir")

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

    settings = {"kind": "pretrain", "block_size": block_size}
    return _load(f"--dataset_dir {dataset_dir}", files, tokenizer, settings, build, cache_dir, use_cache, "the text is shorter than one block; lower --block_size")


def _template_settings(template: PromptTemplate, tokenizer: Any) -> dict[str, Any]:
    """What of a template shapes the samples (part of the cache key); `auto` is the tokenizer's chat_template."""
    return {"template": template.name, "spec": template.spec, "chat_template": getattr(tokenizer, "chat_template", None) if template.is_auto else None}


def _load(
    name: str,
    files: list[Path],
    tokenizer: Any,
    settings: dict[str, Any],
    build: Callable[[], list[dict[str, list[int]]]],
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    empty_hint: str = "no sample has a trainable token left after truncation; raise --cutoff_len",
) -> list[dict[str, list[int]]]:
    """`build()` or its cached result; an empty result is a UserError."""
    samples = build_or_load(name, files, tokenizer, settings, build, cache_dir, use_cache)
    if not samples:
        raise UserError(f"{name}: {empty_hint}")
    return samples

"""Plain text for continued pretraining: documents `[bos] ids [eos]`, concatenated and cut into
fixed-size blocks (the remainder that does not fill a block is dropped and counted), as in
Chinese-LLaMA's run_clm_pt.

Text is read line by line and encoded a batch of lines at a time, so a corpus larger than
memory becomes blocks on disk (`TextBlocks` → data/store.py) or a stream of blocks that trains
without a pass over the corpus first (`StreamingBlocks`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from chinese_vicuna.data.fast_tokenize import BatchEncoder
from chinese_vicuna.data.records import iter_records, iter_text_lines
from chinese_vicuna.data.store import TOKEN_DTYPE
from chinese_vicuna.errors import UserError


def group_into_blocks(token_lists: Iterable[Sequence[int]], block_size: int) -> tuple[list[list[int]], int]:
    """Concatenate and cut into `block_size` blocks; returns (blocks, tokens dropped at the end)."""
    cutter = BlockCutter(block_size)
    blocks = [b.tolist() for b in cutter.add(token_lists)]
    return blocks, len(cutter.carry)


def iter_documents(files: Iterable[str | Path]) -> Iterator[str]:
    """Documents of a corpus, one at a time: every non-empty line of a `.txt` file, the "text"
    of every record of a `.jsonl` file."""
    for path in map(Path, files):
        if path.suffix != ".jsonl":
            yield from iter_text_lines([path])
            continue
        for record in iter_records(path):
            text = record.data.get("text") if isinstance(record.data, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{record.where}: a pretraining .jsonl record needs a string field 'text'")
            if text.strip():
                yield text


class BlockCutter:
    """Concatenate-and-cut that carries the unfinished block from one batch to the next."""

    def __init__(self, block_size: int) -> None:
        if block_size < 2:
            raise UserError(f"--block_size {block_size}: must be at least 2")
        self.block_size = block_size
        self.carry = np.zeros(0, dtype=TOKEN_DTYPE)

    def add(self, token_lists: Iterable[Sequence[int]]) -> np.ndarray:
        """The blocks completed by these token lists, shape (blocks, block_size)."""
        new = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=TOKEN_DTYPE)
        stream = np.concatenate([self.carry, new])
        full = len(stream) // self.block_size * self.block_size
        self.carry = stream[full:].copy()
        return stream[:full].reshape(-1, self.block_size)


class TextBlocks:
    """Iterating gives arrays of blocks (one per batch of lines) of the text files, in order;
    afterwards `documents` and `dropped` (tokens of the unfinished last block) are set."""

    def __init__(self, tokenizer: Any, files: Sequence[str | Path], block_size: int, batch_lines: int = 2000) -> None:
        self.tokenizer = tokenizer
        self.files = list(files)
        self.block_size = block_size
        self.batch_lines = batch_lines
        self.documents = 0
        self.dropped = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        cutter = BlockCutter(self.block_size)
        lines = iter_documents(self.files)
        self.documents = 0

        def batches() -> Iterator[list[str]]:
            while batch := list(itertools.islice(lines, self.batch_lines)):
                self.documents += len(batch)
                yield batch

        for ids in BatchEncoder(self.tokenizer).map(batches()):
            blocks = cutter.add(bos + x + eos for x in ids)
            if len(blocks):
                yield blocks
        self.dropped = len(cutter.carry)


def shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle by a buffer: each item goes into a buffer of `buffer_size`; a random one comes out.

    The same items, buffer and seed give the same order (what resuming relies on)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class StreamingBlocks(IterableDataset):
    """Blocks of text files tokenized as training reads them (no pass over the corpus first).

    The order is deterministic for a seed and epoch: the first `skip` blocks (the validation
    blocks) are left out, the rest shuffled by a buffer of `shuffle_buffer` blocks. The Trainer
    resumes by reading the stream again up to the batch it stopped at, so a resumed run trains
    on the same blocks in the same order as an uninterrupted one.
    """

    def __init__(
        self,
        tokenizer: Any,
        files: Sequence[str | Path],
        block_size: int,
        shuffle_buffer: int = 1000,
        seed: int = 42,
        skip: int = 0,
        take: int | None = None,
    ) -> None:
        self.text_blocks = TextBlocks(tokenizer, files, block_size)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.skip = skip
        self.take = take
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) at each epoch: a new, still seeded, order."""
        self.epoch = epoch

    def blocks(self) -> Iterator[np.ndarray]:
        """The blocks before shuffling (after `skip`, up to `take`)."""
        every = (block for batch in self.text_blocks for block in batch)
        stop = None if self.take is None else self.skip + self.take
        return itertools.islice(every, self.skip, stop)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        for block in shuffled(self.blocks(), self.shuffle_buffer, rng):
            ids = block.astype(np.int64)
            yield {"input_ids": ids, "labels": ids.copy()}

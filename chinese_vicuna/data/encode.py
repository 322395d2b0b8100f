"""Encoding rendered prompts into input_ids and labels.

Tokenization rules (docs/design.md): `[bos] + prompt + response + [eos]`; labels are -100 on text
that is not trained; a sample with no trainable token after truncation is dropped and counted.
Prefix consistency: a sample's first segment is encoded as the tokenizer encodes the whole
text, every later segment as a continuation (no sentencepiece dummy-prefix `▁`), so the ids
before each answer are `tokenizer(rendered prompt)`: what vLLM, TGI, llama.cpp or
`apply_chat_template` feed the model. Training (`tokenize_segment_lists`) and inference
(`encode_segments`, used by infer/generation.py and infer/llamacpp.py) share this one rule.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from chinese_vicuna.data.fast_tokenize import BatchEncoder, encode_segment_texts, literal_specials, sample_starts
from chinese_vicuna.prompts import PromptTemplate, Segment

logger = logging.getLogger(__name__)


IGNORE_INDEX = -100


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Cyclic GC off while millions of token-id lists are built: each collection walks every
    object allocated so far, which slowed tokenizing large sets measurably. Lists of ints
    hold no reference cycles, so nothing is left uncollected."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def assemble(
    segment_ids: Sequence[list[int]],
    trainable: Sequence[bool],
    bos_id: int | None,
    eos_id: int | None,
    train_on_inputs: bool = False,
) -> tuple[list[int], list[int]]:
    """Concatenate per-segment ids into input_ids and labels.

    `[bos]` is never trained; an `eos` appended here (instruction data) is trained, which is
    how the model learns to stop.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    if bos_id is not None:
        input_ids.append(bos_id)
        labels.append(IGNORE_INDEX)
    for ids, train in zip(segment_ids, trainable, strict=True):
        input_ids.extend(ids)
        labels.extend(ids if (train or train_on_inputs) else [IGNORE_INDEX] * len(ids))
    if eos_id is not None:
        input_ids.append(eos_id)
        labels.append(eos_id)
    return input_ids, labels


def encode_segments(
    tokenizer: Any,
    segments: Sequence[Segment],
    add_bos: bool = True,
    add_eos: bool = False,
    train_on_inputs: bool = False,
) -> tuple[list[int], list[int]]:
    """input_ids and labels of one rendered prompt (see `assemble`); the first segment whole,
    the others as continuations."""
    ids = encode_segment_texts(tokenizer, [s.text for s in segments], sample_starts([len(segments)]))
    return assemble(
        ids,
        [s.trainable for s in segments],
        tokenizer.bos_token_id if add_bos else None,
        tokenizer.eos_token_id if add_eos else None,
        train_on_inputs,
    )


@dataclass
class TokenizeStats:
    """Counts reported after tokenization (nothing is skipped silently)."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def log(self, name: str) -> None:
        logger.info(
            "%s: %d records → %d samples; %d truncated at cutoff_len; %d dropped with no trainable token after truncation%s",
            name,
            self.total,
            self.kept,
            self.truncated,
            self.dropped_no_trainable,
            "".join(f"; {v} {k}" for k, v in self.extra.items()),
        )


def tokenize_segment_lists(
    tokenizer: Any,
    segment_lists: Iterable[Sequence[Segment]],
    cutoff_len: int,
    add_eos: bool,
    train_on_inputs: bool = False,
    stats: TokenizeStats | None = None,
    batch_size: int = 4000,
) -> list[dict[str, list[int]]]:
    """Encode many rendered samples (batched), truncate at `cutoff_len`, drop untrainable ones."""
    batches = tokenized_batches(tokenizer, segment_lists, cutoff_len, add_eos, train_on_inputs, stats, batch_size)
    return [sample for batch in batches for sample in batch]


def tokenized_batches(
    tokenizer: Any,
    segment_lists: Iterable[Sequence[Segment]],
    cutoff_len: int,
    add_eos: bool,
    train_on_inputs: bool = False,
    stats: TokenizeStats | None = None,
    batch_size: int = 4000,
) -> Iterator[list[dict[str, list[int]]]]:
    """`tokenize_segment_lists` one batch at a time: `segment_lists` is consumed lazily, so a
    caller that writes each batch away holds only a few batches in memory."""
    stats = stats if stats is not None else TokenizeStats()
    # sentencepiece on worker threads where it gives the tokenizer's ids (data/fast_tokenize.py).
    encoder = BatchEncoder(tokenizer)
    # Looked up once: these tokenizer properties are slow attribute lookups in transformers 5.
    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id if add_eos else None
    batches: list[list[Sequence[Segment]]] = []

    def texts_of_batches() -> Iterator[list[str]]:
        # Rendering happens here, lazily, while earlier batches are being encoded.
        segment_iter = iter(segment_lists)
        while batch := list(itertools.islice(segment_iter, batch_size)):
            batches.append(batch)
            yield [s.text for segs in batch for s in segs], sample_starts(len(segs) for segs in batch)

    with gc_paused():
        for ids in encoder.map(texts_of_batches()):
            pending = batches.pop(0)
            pos = 0
            truncated = dropped = 0
            samples: list[dict[str, list[int]]] = []
            for segs in pending:
                input_ids, labels = assemble(ids[pos : pos + len(segs)], [s.trainable for s in segs], bos_id, eos_id, train_on_inputs)
                pos += len(segs)
                if len(input_ids) > cutoff_len:
                    truncated += 1
                    del input_ids[cutoff_len:], labels[cutoff_len:]
                if labels.count(IGNORE_INDEX) == len(labels):  # no trainable token (count runs in C)
                    dropped += 1
                    continue
                samples.append({"input_ids": input_ids, "labels": labels})
            stats.total += len(pending)
            stats.truncated += truncated
            stats.dropped_no_trainable += dropped
            stats.kept += len(pending) - dropped
            yield samples


def tokenize_instructions(
    records: Iterable[dict[str, str]],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    stats: TokenizeStats | None = None,
) -> list[dict[str, list[int]]]:
    """Alpaca records → samples with `[bos] prompt response [eos]` and masked labels."""
    return [s for batch in instruction_batches(records, tokenizer, template, cutoff_len, train_on_inputs, stats) for s in batch]


def instruction_batches(
    records: Iterable[dict[str, str]],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    stats: TokenizeStats | None = None,
) -> Iterator[list[dict[str, list[int]]]]:
    """`tokenize_instructions` one batch at a time, records read lazily (bounded memory)."""
    # user text keeps "<s>" / "</s>" as text; the template's special tokens stay ids (fast_tokenize.LiteralSpecials)
    p = literal_specials(tokenizer).protect
    segment_lists = (template.instruction_segments(p(r["instruction"]), p(r["input"]), p(r["output"])) for r in records)
    # Chat templates carry their own end-of-turn marker; instruction templates end with EOS.
    return tokenized_batches(
        tokenizer, segment_lists, cutoff_len, add_eos=not template.is_chat, train_on_inputs=train_on_inputs, stats=stats
    )

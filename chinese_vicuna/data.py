"""Load, validate, tokenize, mask labels, cache, and collate training data.

Tokenization rules (docs: design.md): every segment of a rendered prompt is encoded on its
own and the ids are concatenated, `[bos] + prompt + response + [eos]`; labels are -100 on
text that is not trained; padding gets -100 by position, never by token id.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.prompts import PromptTemplate, Segment

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when the tokenized form changes, so old caches are not reused.
CACHE_FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One record of a data file and where it came from (for error messages)."""

    data: Any
    where: str  # "data.jsonl:12" or "data.json record 3"


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records of a `.json` file (a list) or a `.jsonl` file (one JSON value per line).

    Every problem ends in a UserError naming the file and the line or record.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8 (at byte {exc.start}); save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; it needs at least one record")

    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(Record(json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        return records
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, list):
            raise UserError(f"{path}: a .json data file must hold a list of records, got {type(value).__name__}; or use .jsonl")
        if not value:
            raise UserError(f"{path}: the list of records is empty")
        return [Record(v, f"{path} record {i + 1}") for i, v in enumerate(value)]
    raise UserError(f"{path}: unknown data file type {path.suffix!r}; use .json (a list of records) or .jsonl")


def validate_instruction(record: Record) -> dict[str, str]:
    """An alpaca record: `instruction` and `output` strings, optional `input` string."""
    rec = record.data
    if not isinstance(rec, dict):
        raise UserError(f"{record.where}: expected a JSON object with 'instruction' and 'output', got {type(rec).__name__}")
    for key in ("instruction", "output"):
        if key not in rec:
            raise UserError(f"{record.where}: missing field {key!r} (an alpaca record needs 'instruction' and 'output')")
    for key in ("instruction", "input", "output"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise UserError(f"{record.where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec["instruction"].strip():
        raise UserError(f"{record.where}: field 'instruction' is empty")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Cyclic GC off while millions of token-id lists are built: each collection walks every
    object allocated so far, which made tokenizing 50k samples ~1.5x slower. Lists of ints
    hold no reference cycles, so nothing is left uncollected."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Ids of many texts in one batched call (the fast tokenizer runs them in parallel)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


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
    """input_ids and labels of one rendered prompt (see `assemble`)."""
    ids = encode_texts(tokenizer, [s.text for s in segments])
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
    stats = stats if stats is not None else TokenizeStats()
    samples: list[dict[str, list[int]]] = []
    # sentencepiece on worker threads where it gives the tokenizer's ids (chinese_vicuna.fast_tokenize).
    from chinese_vicuna.fast_tokenize import batch_encoder

    encoder = batch_encoder(tokenizer)
    # Looked up once: these tokenizer properties are slow attribute lookups in transformers 5.
    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id if add_eos else None
    batches: list[list[Sequence[Segment]]] = []

    def texts_of_batches() -> Iterator[list[str]]:
        # Rendering happens here, lazily, while earlier batches are being encoded.
        segment_iter = iter(segment_lists)
        while batch := list(itertools.islice(segment_iter, batch_size)):
            batches.append(batch)
            yield [s.text for segs in batch for s in segs]

    with gc_paused():
        for ids in encoder.map(texts_of_batches()):
            pending = batches.pop(0)
            pos = 0
            truncated = dropped = 0
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
    return samples


def tokenize_instructions(
    records: Sequence[dict[str, str]],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    stats: TokenizeStats | None = None,
) -> list[dict[str, list[int]]]:
    """Alpaca records → samples with `[bos] prompt response [eos]` and masked labels."""
    segment_lists = (template.instruction_segments(r["instruction"], r["input"], r["output"]) for r in records)
    # Chat templates carry their own end-of-turn marker; instruction templates end with EOS.
    return tokenize_segment_lists(
        tokenizer, segment_lists, cutoff_len, add_eos=not template.is_chat, train_on_inputs=train_on_inputs, stats=stats
    )


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
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

    settings = {
        "template": template.name,
        "spec": template.spec,
        "cutoff_len": cutoff_len,
        "train_on_inputs": train_on_inputs,
        "kind": "instruct",
    }
    samples = build_or_load(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)
    if not samples:
        raise UserError(f"{data_path}: no sample has a trainable token left after truncation; raise --cutoff_len")
    return samples


def data_files(data_path: str | os.PathLike) -> list[Path]:
    """A data file, or every .json/.jsonl file in a folder (sorted)."""
    path = Path(data_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise UserError(f"{path}: folder has no .json or .jsonl data files")
        return files
    if not path.exists():
        raise UserError(f"{path}: data file not found (check --data_path)")
    return [path]


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


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------
@dataclass
class PaddingCollator:
    """Pads input_ids with `pad_token_id` and labels with -100, by position.

    It never rebuilds labels from input_ids (unlike DataCollatorForLanguageModeling), so
    prompt masks survive, and a pad id equal to EOS never masks a real EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

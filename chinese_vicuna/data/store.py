"""Tokenized samples on disk, read by index through memory maps.

A store is a folder written once and then only read:

    input_ids.bin   every sample's ids, concatenated (int32)
    labels.bin      the labels, same layout (absent where labels == input_ids: pretraining blocks)
    offsets.npy     int64, samples + 1 entries: sample i is [offsets[i], offsets[i + 1])
    meta.json       counts, dtype, whether labels.bin exists (written last: a folder without it is incomplete)

Every process (each torchrun rank) maps the same files read-only, so the operating system
keeps one copy of the data in its page cache, shared, and a process's own memory holds only
the samples of the batch at hand.

A stage whose sample is a group of sequences (a preference pair: chosen and rejected) writes
each group as `group_size` consecutive sequences and reads it through `SequenceGroups`: the
same files, no other format.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import make_readable

STORE_FORMAT = 1
TOKEN_DTYPE = np.int32  # ids and labels (-100); every vocabulary here is far below 2**31


class StoreWriter:
    """Appends samples to a new store folder; `close()` writes the offsets and meta.json."""

    def __init__(self, folder: str | os.PathLike, labels_are_input_ids: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.labels_are_input_ids = labels_are_input_ids
        self._ids = (self.folder / "input_ids.bin").open("wb")
        self._labels = None if labels_are_input_ids else (self.folder / "labels.bin").open("wb")
        self._offsets = array("q", [0])  # compact: 8 bytes a sample, not a Python int object each

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def add_samples(self, samples: Sequence[dict[str, Sequence[int]]]) -> None:
        """Append samples given as lists (or arrays) of `input_ids` and `labels`."""
        if not samples:
            return
        lengths = [len(s["input_ids"]) for s in samples]
        ids = np.fromiter((t for s in samples for t in s["input_ids"]), dtype=TOKEN_DTYPE, count=sum(lengths))
        labels = None
        if not self.labels_are_input_ids:
            labels = np.fromiter((t for s in samples for t in s["labels"]), dtype=TOKEN_DTYPE, count=sum(lengths))
        self.add_arrays(ids, lengths, labels)

    def add_arrays(self, ids: np.ndarray, lengths: Iterable[int], labels: np.ndarray | None = None) -> None:
        """Append samples given as one flat array of ids (and of labels) and their lengths."""
        ids = np.ascontiguousarray(ids, dtype=TOKEN_DTYPE)
        self._ids.write(ids.tobytes())
        if self._labels is not None:
            if labels is None or labels.shape != ids.shape:
                raise ValueError("labels must have the shape of input_ids")
            self._labels.write(np.ascontiguousarray(labels, dtype=TOKEN_DTYPE).tobytes())
        end = self._offsets[-1]
        for n in lengths:
            end += int(n)
            self._offsets.append(end)
        if end != self._ids.tell() // TOKEN_DTYPE().itemsize:
            raise ValueError("lengths do not add up to the ids written")

    def close(self) -> None:
        self._ids.close()
        if self._labels is not None:
            self._labels.close()
        np.save(self.folder / "offsets.npy", np.frombuffer(self._offsets, dtype=np.int64))
        meta = {
            "format": STORE_FORMAT,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "samples": len(self),
            "tokens": int(self._offsets[-1]),
            "labels_are_input_ids": self.labels_are_input_ids,
        }
        (self.folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


class TokenizedDataset(Dataset):
    """Samples of a store by index: `{"input_ids": int64 array, "labels": int64 array}`.

    `select(indices)` is a view on a subset (the train/validation split) that shares the maps.
    """

    def __init__(self, folder: str | os.PathLike, indices: np.ndarray | None = None, _arrays: tuple | None = None) -> None:
        self.folder = Path(folder)
        if _arrays is None:
            _arrays = _open(self.folder)
        self._arrays = _arrays
        self.meta, self._ids, self._labels, self._offsets = _arrays
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = int(self.indices[i]) if self.indices is not None else i
        start, end = int(self._offsets[j]), int(self._offsets[j + 1])
        # Copies of one sample (int64, writable): collators and torch get ordinary arrays.
        ids = self._ids[start:end].astype(np.int64)
        labels = ids.copy() if self._labels is None else self._labels[start:end].astype(np.int64)
        return {"input_ids": ids, "labels": labels}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of every sample (in this view's order)."""
        lengths = np.diff(self._offsets)
        return lengths[self.indices] if self.indices is not None else lengths

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenizedDataset:
        base = np.asarray(indices, dtype=np.int64)
        return TokenizedDataset(self.folder, self.indices[base] if self.indices is not None else base, self._arrays)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (DataLoader workers started by spawn) as its folder and indices, not the data.
        return {"folder": self.folder, "indices": self.indices}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["indices"])

    def to_list(self) -> list[dict[str, list[int]]]:
        """Every sample as Python lists (small sets: tests, comparisons)."""
        return [{k: v.tolist() for k, v in s.items()} for s in self]


class SequenceGroups(Dataset):
    """Samples that are groups of `group_size` sequences, stored consecutively in one store:
    sample i is `{"input_ids": [ids of sequence 0, ...], "labels": [...]}` (lists of k arrays,
    under the keys Trainer's column filter keeps). The packing and padding collators take such
    samples as they take single sequences (data/collate.py)."""

    def __init__(self, sequences: TokenizedDataset, group_size: int, groups: np.ndarray | None = None) -> None:
        if group_size < 1 or len(sequences) % group_size:
            raise ValueError(f"{len(sequences)} sequences do not form groups of {group_size}")
        self.sequences, self.group_size = sequences, group_size
        self.groups = np.arange(len(sequences) // group_size) if groups is None else np.asarray(groups, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, list[np.ndarray]]:
        first = int(self.groups[i]) * self.group_size
        members = [self.sequences[first + j] for j in range(self.group_size)]
        return {key: [m[key] for m in members] for key in ("input_ids", "labels")}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of every sample (all its sequences), in this view's order: what a packed row holds."""
        return self.sequences.lengths.reshape(-1, self.group_size).sum(axis=1)[self.groups]

    def select(self, indices: Sequence[int] | np.ndarray) -> SequenceGroups:
        return SequenceGroups(self.sequences, self.group_size, self.groups[np.asarray(indices, dtype=np.int64)])

    def to_list(self) -> list[dict[str, list[list[int]]]]:
        return [{k: [x.tolist() for x in v] for k, v in s.items()} for s in self]


def _open(folder: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None, np.ndarray]:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])

    def mapped(name: str) -> np.ndarray:
        if meta["tokens"] == 0:
            return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file
        return np.memmap(folder / name, dtype=dtype, mode="r", shape=(meta["tokens"],))

    offsets = np.load(folder / "offsets.npy", mmap_mode="r")
    ids = mapped("input_ids.bin")
    labels = None if meta["labels_are_input_ids"] else mapped("labels.bin")
    return meta, ids, labels, offsets


def check_store(folder: str | os.PathLike) -> str | None:
    """What is wrong with a store folder (incomplete, truncated, inconsistent), or None."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != STORE_FORMAT:
            return f"format {meta.get('format')}, expected {STORE_FORMAT}"
        itemsize = np.dtype(meta["dtype"]).itemsize
        files = ["input_ids.bin"] + ([] if meta["labels_are_input_ids"] else ["labels.bin"])
        for name in files:
            size = (folder / name).stat().st_size
            if size != meta["tokens"] * itemsize:
                return f"{name} has {size} bytes, expected {meta['tokens'] * itemsize}"
        offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        if len(offsets) != meta["samples"] + 1 or offsets[0] != 0 or offsets[-1] != meta["tokens"]:
            return "offsets.npy does not match meta.json"
        if len(offsets) > 1 and (np.diff(offsets) < 0).any():
            return "offsets.npy is not increasing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({exc})"
    return None


def publish(tmp_folder: Path, folder: Path) -> None:
    """Move a finished store into place in one rename, readable as the umask allows (a
    temporary folder is created private); if another process published it first, keep theirs."""
    make_readable(tmp_folder, directory=True)
    for path in tmp_folder.iterdir():
        make_readable(path)
    try:
        os.rename(tmp_folder, folder)
    except OSError:
        if check_store(folder) is not None:
            raise UserError(f"{folder}: cannot replace this cache folder; delete it and run again") from None
        shutil.rmtree(tmp_folder, ignore_errors=True)

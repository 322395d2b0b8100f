"""Collators: padding by position (labels never rebuilt from input_ids) and padding-free packing
(docs/benchmarks.md; the packed loss and attention live in train/packing.py).

Both take samples of any stage whose samples are sequences: one sequence (`input_ids`,
`labels` arrays) or a group of them (lists of arrays: a preference pair, data/store.py
`SequenceGroups`). A group's sequences become consecutive rows (padded) or consecutive
segments of the packed row, in order, so sequence `g * k + j` is member j of sample g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chinese_vicuna.data.encode import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Pads input_ids with `pad_token_id` and labels with -100, by position.

    It never rebuilds labels from input_ids (unlike DataCollatorForLanguageModeling), so
    prompt masks survive, and a pad id equal to EOS never masks a real EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = sequences_of(features)
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
            input_ids[i, :k] = torch.as_tensor(np.asarray(f["input_ids"], dtype=np.int64))
            labels[i, :k] = torch.as_tensor(np.asarray(f["labels"], dtype=np.int64))
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def is_group(feature: dict[str, Any]) -> bool:
    """A sample holding several sequences (lists of arrays), not one."""
    ids = feature["input_ids"]
    return len(ids) > 0 and not np.isscalar(ids[0])


def sequences_of(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sequences of a micro-batch, in order: a single-sequence sample is itself, a group its members."""
    if not any(is_group(f) for f in features):
        return features
    out = []
    for f in features:
        if is_group(f):
            out += [{"input_ids": ids, "labels": labels} for ids, labels in zip(f["input_ids"], f["labels"], strict=True)]
        else:
            out.append(f)
    return out


def pack_sequences(ids: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Sequences → one packed row (batch 1): input_ids, position_ids (restarting at 0 for each
    sequence), labels, shift_labels (each position's target, -100 at every sequence's last
    token, so nothing predicts across a boundary) and sequence_spans ((sequences, 2) start/end
    offsets in the row: what a stage sums per-sequence log-probabilities over)."""
    ignore = np.array([IGNORE_INDEX], dtype=np.int64)
    # Position t predicts label t+1 of the SAME sequence; a sequence's last token predicts nothing.
    shift_labels = [part for lab in labels for part in (lab[1:], ignore)]
    position_ids = [np.arange(len(x), dtype=np.int64) for x in ids]
    ends = np.cumsum([len(x) for x in ids], dtype=np.int64)
    spans = np.stack([ends - [len(x) for x in ids], ends], axis=1)

    def row(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts)).unsqueeze(0)

    return {
        "input_ids": row(ids),
        "position_ids": row(position_ids),
        "labels": row(labels),
        "shift_labels": row(shift_labels),
        "sequence_spans": torch.from_numpy(spans),
    }


@dataclass
class PackedCollator:
    """A micro-batch of samples → one row (`pack_sequences`): every sequence of every sample,
    a group's members one after the other.

    Samples may be lists or numpy arrays (TokenizedDataset); the row is built with numpy."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = sequences_of(features)
        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        return pack_sequences(ids, labels)

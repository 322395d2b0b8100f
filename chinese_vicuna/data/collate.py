"""Collators: padding by position (labels never rebuilt from input_ids) and padding-free packing
(docs/benchmarks.md; the packed loss and attention live in train/packing.py).
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


@dataclass
class PackedCollator:
    """A micro-batch of samples → one row: input_ids, position_ids, labels, shift_labels.

    Samples may be lists or numpy arrays (TokenizedDataset); the row is built with numpy."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        # Position t predicts label t+1 of the SAME sample; a sample's last token predicts nothing.
        ignore = np.array([IGNORE_INDEX], dtype=np.int64)
        shift_labels = [part for lab in labels for part in (lab[1:], ignore)]
        position_ids = [np.arange(len(x), dtype=np.int64) for x in ids]

        def row(parts: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(parts)).unsqueeze(0)

        return {"input_ids": row(ids), "position_ids": row(position_ids), "labels": row(labels), "shift_labels": row(shift_labels)}

"""Collators: padding by position (labels never rebuilt from input_ids) and padding-free packing
(docs/benchmarks.md; the packed loss and attention live in train/packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
            input_ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackedCollator:
    """A micro-batch of samples → one row: input_ids, position_ids, labels, shift_labels."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        position_ids: list[int] = []
        labels: list[int] = []
        shift_labels: list[int] = []
        for f in features:
            ids, lab = list(f["input_ids"]), list(f["labels"])
            input_ids.extend(ids)
            labels.extend(lab)
            position_ids.extend(range(len(ids)))
            # Position t predicts label t+1 of the SAME sample; a sample's last token predicts nothing.
            shift_labels.extend([*lab[1:], IGNORE_INDEX])

        def row(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).unsqueeze(0)

        return {"input_ids": row(input_ids), "position_ids": row(position_ids), "labels": row(labels), "shift_labels": row(shift_labels)}

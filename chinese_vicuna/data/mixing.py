"""Several training files mixed by sampling weights, and a separate validation file.

    --data_path general.jsonl,medical.jsonl --data_weights 0.3,0.7 [--data_mix_size N]
    --val_data_path val.jsonl

Each file is loaded (and cached) on its own, exactly as a single --data_path is. The mixture
has `data_mix_size` samples (default: all files' samples together), of which file i gets the
share w_i / sum(w), rounded by largest remainder. A file drawn fewer times than it has samples
gives a seeded random subset; one drawn more often is repeated whole and topped up with a
random subset. The result is shuffled with the seed: the same seed gives the same data.
When the files are tokenized stores (what finetune.py loads), the draws are made on sample
numbers and the mixture is a `MixedDataset`: a view that reads each sample from its file's
mapped store when the Trainer asks, so no sample is copied (the same samples, in the same order,
as drawing the samples themselves).

The validation set is the --val_data_path file when given; otherwise --val_set_size samples
held out (seeded) from all files before mixing, so no repeated sample lands on both sides.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from torch.utils.data import Dataset

from chinese_vicuna.args import DataArguments
from chinese_vicuna.data.datasets import split_train_val
from chinese_vicuna.data.store import SequenceGroups, TokenizedDataset
from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class MixPart:
    path: str
    weight: float
    available: int
    drawn: int = 0


def parse_mixture(data_path: str, data_weights: str | None) -> list[tuple[str, float | None]]:
    """[(path, weight)] from comma lists; weights None when not given."""
    paths = [p.strip() for p in data_path.split(",") if p.strip()]
    if not paths:
        raise UserError("--data_path is empty")
    if data_weights is None or not data_weights.strip():
        return [(p, None) for p in paths]
    try:
        weights = [float(w) for w in data_weights.split(",")]
    except ValueError:
        raise UserError(f"--data_weights {data_weights}: comma-separated numbers, one per --data_path file, e.g. 0.3,0.7") from None
    if len(weights) != len(paths):
        raise UserError(f"--data_weights has {len(weights)} weights for {len(paths)} --data_path files; give one per file")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--data_weights {data_weights}: weights must be >= 0 and not all 0")
    return list(zip(paths, weights, strict=True))


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(pool: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """`count` samples of `pool`: whole repeats, then a random subset without replacement."""
    if not pool:
        return []
    repeats, rest = divmod(count, len(pool))
    return list(pool) * repeats + rng.sample(list(pool), rest)


def mix(pools: Sequence[Sequence[T]], weights: Sequence[float], seed: int, total: int | None = None) -> tuple[list[T], list[int]]:
    """The mixture (shuffled) and how many samples came from each pool."""
    total = sum(len(p) for p in pools) if total is None else total
    counts = allocate(total, weights)
    for pool, n in zip(pools, counts, strict=True):
        if n and not pool:
            raise UserError("a --data_path file with a non-zero weight has no samples")
    rng = random.Random(seed)
    mixed = [s for pool, n in zip(pools, counts, strict=True) for s in draw(pool, n, rng)]
    rng.shuffle(mixed)
    return mixed, counts


class MixedDataset(Dataset):
    """Samples of several datasets by number (global numbers: dataset k's sample j is
    offsets[k] + j): a view; each sample is read from its dataset when asked for."""

    def __init__(self, pools: Sequence[TokenizedDataset | SequenceGroups], numbers: Sequence[int] | np.ndarray) -> None:
        self.pools = list(pools)
        self.offsets = np.cumsum([0] + [len(p) for p in self.pools])
        self.numbers = np.asarray(numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        g = int(self.numbers[i])
        k = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return self.pools[k][g - int(self.offsets[k])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of every sample, in this view's order."""
        return np.concatenate([p.lengths for p in self.pools])[self.numbers]

    def select(self, indices: Sequence[int] | np.ndarray) -> MixedDataset:
        return MixedDataset(self.pools, self.numbers[np.asarray(indices, dtype=np.int64)])

    def to_list(self) -> list[dict[str, list[int]]]:
        """Every sample as Python lists (small sets: tests, comparisons)."""
        return [{k: v.tolist() for k, v in s.items()} for s in self]


def load_train_val(data_args: DataArguments, load: Callable[[str], list[T]], seed: int) -> tuple[list[T], list[T]]:
    """Training and validation samples for finetune.py / finetune_chat.py.

    `load(path)` tokenizes (or reads from the cache) one --data_path entry. One file and no
    weights: exactly the single-file behaviour (load, then a seeded --val_set_size split).
    """
    data_path, val_data_path, val_set_size, mix_size = data_args.data_path, data_args.val_data_path, data_args.val_set_size, data_args.data_mix_size
    parts = parse_mixture(data_path, data_args.data_weights)
    if val_data_path:
        val = load(val_data_path)
        if val_set_size:
            logger.info(
                "validation: %d samples from --val_data_path %s (--val_set_size %d not used)", len(val), val_data_path, val_set_size
            )
    if len(parts) == 1 and parts[0][1] is None and mix_size is None:
        samples = load(parts[0][0])
        return (samples, val) if val_data_path else split_train_val(samples, val_set_size, seed)

    pools = [load(path) for path, _ in parts]
    # Stores: draw sample numbers and return views (memory flat in the data size); the draws
    # are the same as on the samples themselves, so the data is the same.
    stores = all(isinstance(p, (TokenizedDataset, SequenceGroups)) for p in pools)
    offsets = np.cumsum([0] + [len(p) for p in pools]).tolist()
    sources = [range(offsets[k], offsets[k + 1]) for k in range(len(pools))] if stores else pools
    if val_data_path:
        train_pools = [list(p) for p in sources] if stores else pools
    else:
        tagged = [(i, s) for i, pool in enumerate(sources) for s in pool]
        train_tagged, val_tagged = split_train_val(tagged, val_set_size, seed)
        val = [s for _, s in val_tagged]
        train_pools = [[s for i, s in train_tagged if i == k] for k in range(len(pools))]
        if stores:
            val = MixedDataset(pools, val)
    weights = [w if w is not None else float(len(p)) for (_, w), p in zip(parts, train_pools, strict=True)]
    if mix_size is not None and mix_size < 1:
        raise UserError(f"--data_mix_size {mix_size}: must be at least 1")
    train, counts = mix(train_pools, weights, seed, mix_size)
    if stores:
        train = MixedDataset(pools, train)
    wsum = sum(weights)
    for (path, _), pool, w, n in zip(parts, train_pools, weights, counts, strict=True):
        logger.info(
            "data mix (seed %d): %s: %d samples, weight %.3g (%.1f%%) → %d drawn (%.2f passes over it)",
            seed, path, len(pool), w, 100 * w / wsum, n, n / max(len(pool), 1),
        )  # fmt: skip
    logger.info("data mix: %d training samples, %d validation samples", len(train), len(val))
    return train, val

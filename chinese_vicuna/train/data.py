"""The training data as the SFT recipes get it: `data.mixing.load_train_val` with the default
hold-out sized to the data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from chinese_vicuna.args import DataArguments
from chinese_vicuna.data.mixing import load_train_val, parse_mixture

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_VAL_SET_SIZE = 200
DEFAULT_VAL_SHARE = 10  # the default hold-out takes at most 1/10 of the samples


def default_val_set_size(samples: int) -> int:
    """alpaca-lora's fixed 200 held-out samples, but never more than a tenth of the data (at least one
    where there are two samples), so the defaults run on small data such as the 72 shipped samples."""
    return min(DEFAULT_VAL_SET_SIZE, max(samples // DEFAULT_VAL_SHARE, 1 if samples > 1 else 0))


def load_training_data(data_args: DataArguments, load: Callable[[str], list[T]], seed: int) -> tuple[list[T], list[T]]:
    """(train, validation) samples; `--val_set_size` not given → `default_val_set_size` of the samples (logged).
    An explicit --val_set_size is kept as given (`split_train_val` refuses one that leaves no training data)."""
    if data_args.val_set_size is not None or data_args.val_data_path:
        return load_split(data_args, load, seed, data_args.val_set_size or 0)
    loaded: dict[str, list[T]] = {}

    def load_once(path: str) -> list[T]:
        if path not in loaded:
            loaded[path] = load(path)
        return loaded[path]

    total = sum(len(load_once(path)) for path, _ in parse_mixture(data_args.data_path, data_args.data_weights))
    size = default_val_set_size(total)
    logger.info(
        "validation: %d of %d samples held out (the default: %d, at most a tenth of the data; --val_set_size N to choose, 0 for none)",
        size, total, DEFAULT_VAL_SET_SIZE,
    )  # fmt: skip
    return load_split(data_args, load_once, seed, size)


def load_split(data_args: DataArguments, load: Callable[[str], list[T]], seed: int, val_set_size: int) -> tuple[list[T], list[T]]:
    """`data.mixing.load_train_val` with the values of the data flags."""
    return load_train_val(
        data_args.data_path, load, seed, data_args.data_weights, data_args.val_data_path, val_set_size, data_args.data_mix_size
    )

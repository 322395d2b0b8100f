"""Mixing several data files by weight, and a separate validation file (chinese_vicuna/datatools/mixing.py)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from chinese_vicuna.args import DataArguments
from chinese_vicuna.data.datasets import load_instruction_dataset
from chinese_vicuna.data.mixing import MixedDataset, allocate, load_train_val, mix, parse_mixture
from chinese_vicuna.data.store import StoreWriter, TokenizedDataset
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import memorize_args, run_script


def mixture(data_path: str, data_weights: str | None = None, **kwargs: object) -> DataArguments:
    """The data flags of a mixture, as parse_args fills them."""
    return DataArguments(data_path=data_path, data_weights=data_weights, **kwargs)


def train_val(args: DataArguments, load, seed: int):
    """`load_train_val` with the values of the data flags, as train/data.py passes them."""
    return load_train_val(args.data_path, load, seed, args.data_weights, args.val_data_path, args.val_set_size or 0, args.data_mix_size)


def test_proportions_follow_the_weights_and_the_seed_fixes_the_data() -> None:
    general = [("g", i) for i in range(1000)]
    medical = [("m", i) for i in range(200)]
    mixed, counts = mix([general, medical], [0.3, 0.7], seed=1, total=5000)
    share = Counter(tag for tag, _ in mixed)
    assert len(mixed) == 5000 and counts == [1500, 3500] and share == {"g": 1500, "m": 3500}
    # medical is drawn 17.5 times: every sample 17 or 18 times; general 1.5 times: 1 or 2 times
    per = Counter(mixed)
    assert {per[s] for s in medical} == {17, 18} and {per[s] for s in general} == {1, 2}
    # a smaller draw is a subset without repeats, and the order is shuffled
    small, _ = mix([general, medical], [0.3, 0.7], seed=1, total=100)
    assert Counter(Counter(small).values()) == {1: 100} and small[:30] != sorted(small[:30])
    assert mix([general, medical], [0.3, 0.7], seed=1, total=5000)[0] == mixed
    assert mix([general, medical], [0.3, 0.7], seed=2, total=5000)[0] != mixed
    # default size: all samples together; weights 1,1 on unequal files still mean half and half
    mixed, counts = mix([general, medical], [1, 1], seed=0)
    assert counts == [600, 600] and len(mixed) == 1200


def test_allocate_and_parse() -> None:
    assert allocate(10, [1, 1, 1]) == [4, 3, 3] and sum(allocate(7, [0.2, 0.5, 0.3])) == 7
    assert parse_mixture("a.jsonl, b.jsonl", "0.3,0.7") == [("a.jsonl", 0.3), ("b.jsonl", 0.7)]
    assert parse_mixture("a.jsonl", None) == [("a.jsonl", None)]
    with pytest.raises(UserError, match="2 weights for 3 --data_path files"):
        parse_mixture("a,b,c", "1,2")
    with pytest.raises(UserError, match="comma-separated numbers"):
        parse_mixture("a,b", "1,x")


def test_single_file_is_unchanged_and_mixtures_hold_out_before_mixing() -> None:
    pools = {"a": [("a", i) for i in range(50)], "b": [("b", i) for i in range(10)], "v": [("v", i) for i in range(5)]}
    from chinese_vicuna.data.datasets import split_train_val

    assert train_val(mixture("a", val_set_size=7), pools.__getitem__, 42) == split_train_val(pools["a"], 7, 42)
    train, val = train_val(mixture("a", val_data_path="v", val_set_size=7), pools.__getitem__, 42)
    assert train == pools["a"] and val == pools["v"]
    train, val = train_val(mixture("a,b", "1,3", val_set_size=6, data_mix_size=80), pools.__getitem__, 42)
    assert len(val) == 6 and len(train) == 80 and not set(val) & set(train)
    assert Counter(t for t, _ in train) == {"a": 20, "b": 60}
    assert train_val(mixture("a,b", "1,3", val_set_size=6, data_mix_size=80), pools.__getitem__, 42) == (train, val)


def test_stores_mix_as_views_with_the_same_samples(tmp_path: Path) -> None:
    """Tokenized stores are mixed by sample number: the mixture and the held-out set are views
    over the stores (no sample copied) with the same samples, in the same order, as mixing the
    samples themselves."""
    stores = {}
    for name, count, token in (("a", 40, 10), ("b", 7, 20), ("v", 3, 30)):
        writer = StoreWriter(tmp_path / name)
        writer.add_samples([{"input_ids": [token, i, i + 1][: 1 + i % 3], "labels": [-100, i, i + 1][: 1 + i % 3]} for i in range(count)])
        writer.close()
        stores[name] = TokenizedDataset(tmp_path / name)
    lists = {k: v.to_list() for k, v in stores.items()}
    for flags in (dict(val_set_size=5, data_mix_size=60), dict(val_data_path="v"), dict(val_set_size=0)):
        train, val = train_val(mixture("a,b", "1,3", **flags), stores.__getitem__, 42)
        expected_train, expected_val = train_val(mixture("a,b", "1,3", **flags), lists.__getitem__, 42)
        assert isinstance(train, MixedDataset) and train.to_list() == expected_train
        assert (val.to_list() if len(val) else []) == list(expected_val)
        assert train.lengths.tolist() == [len(s["input_ids"]) for s in expected_train]
    assert Counter(s["input_ids"][0] for s in train.to_list()) == {10: 12, 20: 35}  # 1:3 of 47 (largest remainder)
    assert train.select([3, 1]).to_list() == [train.to_list()[3], train.to_list()[1]]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_finetune_mixes_files_caches_each_and_uses_the_validation_file(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    general = write(tmp_path / "general.jsonl", [{"instruction": f"常识问题{i}", "input": "", "output": f"回答{i}"} for i in range(12)])
    medical = write(tmp_path / "medical.jsonl", [{"instruction": f"医学问题{i}", "input": "", "output": f"医学回答{i}"} for i in range(4)])
    val = write(tmp_path / "val.jsonl", [{"instruction": "验证", "input": "", "output": "好"}] * 3)
    cache = tmp_path / "cache"
    args = memorize_args(tiny_model_dir, general, tmp_path / "out", epochs=1, save_steps=100)
    args[args.index("--data_path") + 1] = f"{general},{medical}"
    args[args.index("--val_set_size") + 1] = "5"
    proc = run_script(*args, "--data_weights", "0.25,0.75", "--val_data_path", str(val), "--cache_dir", str(cache), "--max_steps", "1",
                      env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert f"{general}: 12 samples, weight 0.25 (25.0%) → 4 drawn (0.33 passes over it)" in log
    assert f"{medical}: 4 samples, weight 0.75 (75.0%) → 12 drawn (3.00 passes over it)" in log
    assert "data mix: 16 training samples, 3 validation samples" in log
    assert "16 training samples, 3 eval" in log
    assert len([p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 3  # each file tokenized and cached on its own

    # in process, from the cache: the same mixture again
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = load_template("alpaca", tokenizer)

    def load(path: str) -> list:
        return load_instruction_dataset(path, tokenizer, template, 256, cache_dir=cache).to_list()

    caplog.set_level(logging.INFO)
    first = train_val(mixture(f"{general},{medical}", "0.25,0.75", val_data_path=str(val), val_set_size=5), load, 42)
    assert caplog.text.count("loaded from cache") == 3
    assert train_val(mixture(f"{general},{medical}", "0.25,0.75", val_data_path=str(val), val_set_size=5), load, 42) == first
    assert train_val(mixture(f"{general},{medical}", "0.25,0.75", val_data_path=str(val), val_set_size=5), load, 43) != first

"""Data at scale, on small data: memory-mapped stores give the in-memory ids, batches and loss;
the cache is atomic and checked; text streams into blocks; a streamed run resumes at its block."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chinese_vicuna.data.collate import PackedCollator, PaddingCollator
from chinese_vicuna.data.datasets import load_instruction_dataset, split_train_val
from chinese_vicuna.data.encode import tokenize_instructions
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.data.store import StoreWriter, TokenizedDataset
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import SAMPLE_INSTRUCT


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def in_memory(tok) -> list[dict[str, list[int]]]:
    """Today's in-memory samples of the sample file (the reference)."""
    records = [validate_instruction(r) for r in read_records(SAMPLE_INSTRUCT)]
    return tokenize_instructions(records, tok, load_template("alpaca", tok), 256)


def test_store_gives_the_in_memory_samples_batches_and_loss(tiny_model_dir: Path, tok, in_memory, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        dataset = load_instruction_dataset(SAMPLE_INSTRUCT, tok, load_template("alpaca", tok), 256, cache_dir=tmp_path)
    assert isinstance(dataset, TokenizedDataset) and len(dataset) == len(in_memory)
    assert dataset.to_list() == in_memory
    assert "records/s" in caplog.text
    assert dataset.lengths.tolist() == [len(s["input_ids"]) for s in in_memory]
    # the split picks the same samples by index as it does from the lists
    train, val = split_train_val(dataset, 10, seed=3)
    train_list, val_list = split_train_val(in_memory, 10, seed=3)
    assert train.to_list() == train_list and val.to_list() == val_list
    assert split_train_val(dataset, 0)[0] is dataset and len(split_train_val(dataset, 0)[1]) == 0
    # both collators build the same tensors from arrays as from lists, and the model the same loss
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    picks = [0, 5, 9, 2]
    for collator in (PaddingCollator(tok.pad_token_id), PackedCollator()):
        from_store, from_lists = collator([train[i] for i in picks]), collator([train_list[i] for i in picks])
        assert from_store.keys() == from_lists.keys()
        for key in from_lists:
            assert torch.equal(from_store[key], from_lists[key]), key
        batch = {k: v for k, v in from_store.items() if k != "shift_labels"}
        with torch.no_grad():
            assert model(**batch).loss.item() == model(**{k: v for k, v in from_lists.items() if k != "shift_labels"}).loss.item()


def test_cache_is_atomic_readable_and_checked(tok, tmp_path: Path, caplog) -> None:
    template = load_template("alpaca", tok)
    data = tmp_path / "d.jsonl"
    lines = SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:12]
    data.write_text("\n".join([*lines, '{"instruction": "坏记录"}']) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    # a record that fails validation halfway through the stream: no cache entry, no leftovers
    with pytest.raises(UserError, match=r"d\.jsonl:13: missing field 'output'"):
        load_instruction_dataset(data, tok, template, 256, cache_dir=cache)
    assert list(cache.iterdir()) == []
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    old_umask = os.umask(0o022)
    try:
        first = load_instruction_dataset(data, tok, template, 256, cache_dir=cache).to_list()
    finally:
        os.umask(old_umask)
    (folder,) = cache.iterdir()  # only the published folder: the temporary one was renamed
    assert not folder.name.startswith(".")
    assert folder.stat().st_mode & 0o777 == 0o755  # other users (and ranks) may read it
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
    assert json.loads((folder / "meta.json").read_text())["samples"] == len(first) == 12
    # a damaged entry (a truncated file) is found on the next load and rebuilt, not trained on
    with (folder / "labels.bin").open("r+b") as f:
        f.truncate(8)
    with caplog.at_level(logging.WARNING):
        again = load_instruction_dataset(data, tok, template, 256, cache_dir=cache)
    assert "is damaged (labels.bin has 8 bytes" in caplog.text
    assert again.to_list() == first


def test_store_writer_arrays_and_views(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", labels_are_input_ids=True)
    writer.add_arrays(np.arange(12), [4, 4, 4])
    writer.add_samples([{"input_ids": [20, 21], "labels": [20, 21]}])
    writer.close()
    dataset = TokenizedDataset(tmp_path / "s")
    assert [s["input_ids"].tolist() for s in dataset] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [20, 21]]
    assert dataset[-1]["labels"].tolist() == [20, 21] and dataset[1]["input_ids"].dtype == np.int64
    view = dataset.select([3, 1]).select([1])
    assert len(view) == 1 and view[0]["input_ids"].tolist() == [4, 5, 6, 7]
    with pytest.raises(IndexError):
        view[1]

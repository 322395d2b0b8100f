"""Data at scale, on small data: memory-mapped stores give the in-memory ids, batches and loss;
the cache is atomic and checked; text streams into blocks; a streamed run resumes at its block."""

from __future__ import annotations

import json
import logging
import os
import pickle
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
    # pickled (a spawned DataLoader worker) as its folder and indices, not its data
    assert len(pickle.dumps(view)) < 1000 and pickle.loads(pickle.dumps(view)).to_list() == view.to_list()


PRETRAIN_DIR = SAMPLE_INSTRUCT.parent.parent / "pretrain"


def test_text_corpus_blocks_stream_and_store_alike(tok, tmp_path: Path) -> None:
    from chinese_vicuna.data.datasets import load_pretrain_dataset, pretrain_files
    from chinese_vicuna.data.pretrain import StreamingBlocks, TextBlocks

    files = pretrain_files(PRETRAIN_DIR)
    stored = load_pretrain_dataset(PRETRAIN_DIR, tok, 32, use_cache=False)
    every = [b["input_ids"].tolist() for b in stored]
    # small batches of lines (many carries between batches) cut the same blocks
    assert [b.tolist() for batch in TextBlocks(tok, files, 32, batch_lines=3) for b in batch] == every
    in_order = [b["input_ids"].tolist() for b in StreamingBlocks(tok, files, 32, shuffle_buffer=1, skip=5)]
    assert in_order == every[5:]
    shuffled = [b["input_ids"].tolist() for b in StreamingBlocks(tok, files, 32, shuffle_buffer=16, seed=7, skip=5)]
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    again = StreamingBlocks(tok, files, 32, shuffle_buffer=16, seed=7, skip=5)
    assert [b["input_ids"].tolist() for b in again] == shuffled  # deterministic: what resuming relies on
    again.set_epoch(1)
    assert [b["input_ids"].tolist() for b in again] != shuffled
    # a .jsonl corpus: one document per record's "text"
    lines = [line for p in files for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    assert load_pretrain_dataset(corpus, tok, 32, use_cache=False).to_list() == stored.to_list()


def test_streamed_pretraining_resumes_after_a_kill_at_the_same_block(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import pretrain

    from chinese_vicuna.train.packing import PackedTrainer

    seen: list[list[int]] = []
    kill_at: list[int] = []
    real_step = PackedTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        if kill_at and len(seen) == kill_at[0]:
            raise KeyboardInterrupt("killed")  # as a kill: after checkpoint-2, before step 3
        seen.append(inputs["input_ids"][0, :16].tolist())
        return real_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(PackedTrainer, "training_step", recording_step)

    def run(out: Path, *extra: str) -> None:
        pretrain.main([
            "--base_model", str(tiny_model_dir), "--dataset_dir", str(PRETRAIN_DIR), "--output_dir", str(out),
            "--streaming", "true", "--shuffle_buffer", "16", "--block_size", "32", "--val_set_size", "0",
            "--micro_batch_size", "2", "--batch_size", "2", "--max_steps", "4", "--save_steps", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true", *extra,
        ])  # fmt: skip

    run(tmp_path / "whole")
    uninterrupted, seen[:] = list(seen), []
    assert len(uninterrupted) == 4 and uninterrupted[2] != uninterrupted[0]
    kill_at.append(2)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: a clean stop (exit 130) that says how to resume
        run(tmp_path / "killed")
    assert stopped.value.code == 130 and "--resume_from_checkpoint true" in capsys.readouterr().err
    assert seen == uninterrupted[:2] and (tmp_path / "killed" / "checkpoint-2").is_dir()
    kill_at.clear()
    seen.clear()
    run(tmp_path / "killed", "--resume_from_checkpoint", "true")
    assert seen == uninterrupted[2:]  # the blocks of steps 3 and 4, not the stream's first ones
    with pytest.raises(SystemExit):
        pretrain.main(["--base_model", str(tiny_model_dir), "--dataset_dir", str(PRETRAIN_DIR), "--output_dir", str(tmp_path / "x"),
                       "--streaming", "true"])  # fmt: skip
    assert "--streaming true: pass --max_steps" in capsys.readouterr().err

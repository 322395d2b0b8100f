"""Batched tokenization gives the same ids as one-sample-at-a-time, and is much faster."""

from __future__ import annotations

import time
from pathlib import Path

from chinese_vicuna.data.encode import encode_segments, tokenize_instructions
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "instruct" / "data_sample.jsonl"


def test_batched_tokenization_gives_the_ids_of_one_at_a_time(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = load_template("alpaca", tokenizer)
    base = [validate_instruction(r) for r in read_records(SAMPLE)]
    # Distinct texts (a numbered question each): repeated texts would hit the tokenizer's word cache.
    records = [dict(base[i % len(base)], instruction=f"{base[i % len(base)]['instruction']} 第{i}题") for i in range(4000)]
    cutoff = 256

    def one_at_a_time(recs: list[dict]) -> list[list[int]]:
        out = []
        for r in recs:
            ids, _ = encode_segments(tokenizer, template.instruction_segments(r["instruction"], r["input"], r["output"]), add_eos=True)
            out.append(ids[:cutoff])
        return out

    # Speed is the benchmark's (`tools/benchmark.py tokenize`, docs/benchmarks.md); here the ids.
    t0 = time.perf_counter()
    single = one_at_a_time(records[:1000])
    single_s = (time.perf_counter() - t0) * len(records) / 1000
    t0 = time.perf_counter()
    batched = tokenize_instructions(records, tokenizer, template, cutoff)
    batched_s = time.perf_counter() - t0
    assert [s["input_ids"] for s in batched[:1000]] == single
    print(f"\nbatched {batched_s:.2f} s vs one at a time {single_s:.2f} s (estimated) for {len(records)} samples")


def test_fast_path_gives_hf_ids_for_text_starting_with_whitespace(tiny_model_dir: Path) -> None:
    from chinese_vicuna.data.fast_tokenize import BatchEncoder

    tokenizer = load_tokenizer(str(tiny_model_dir))
    encoder = BatchEncoder(tokenizer)
    assert encoder.fast  # the tiny model folder has its tokenizer.model: sentencepiece is used
    # where sentencepiece and the converted HF tokenizer disagree (leading spaces: code answers),
    # added-token text, and plain text; in one call and pipelined over several batches
    texts = ["  two  spaces", "    def f():\n        return 1", " x", "\n\n换行开头", "你好，世界！", "答案</s>结束"] * 40
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encoder(texts) == want
    assert [ids for batch in encoder.map([texts[i : i + 7] for i in range(0, len(texts), 7)]) for ids in batch] == want
    assert encoder.fast


def test_fast_path_falls_back_to_hf_when_sentencepiece_disagrees(tiny_model_dir: Path, caplog) -> None:
    from chinese_vicuna.data.fast_tokenize import BatchEncoder

    tokenizer = load_tokenizer(str(tiny_model_dir))
    encoder = BatchEncoder(tokenizer)
    real_encode = encoder.sp.encode

    def wrong_on_first_text(texts: list[str], **kwargs: object) -> list[list[int]]:
        ids = real_encode(texts, **kwargs)
        return [[*ids[0], 5], *ids[1:]]  # an extra id on the first text of every batch

    encoder.sp.encode = wrong_on_first_text
    texts = [f"第{i}个问题：一年有几个季节？" for i in range(100)]
    with caplog.at_level("WARNING"):
        got = [ids for batch in encoder.map([texts[:50], texts[50:]]) for ids in batch]
    assert got == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert not encoder.fast and "disagree" in caplog.text


class _DisagreeingSentencepiece:
    """A sentencepiece processor that adds an id to the first text of every batch it encodes."""

    def __init__(self, sp: object) -> None:
        self.sp = sp

    def get_piece_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: str | list[str], **kwargs: object) -> list[int] | list[list[int]]:
        ids = self.sp.encode(texts, **kwargs)
        if isinstance(texts, str):  # one text (the continuation probe): as it is
            return ids
        return [[*ids[0], 5], *ids[1:]] if ids else ids


def test_fallback_while_many_batches_are_in_flight_never_crashes(tiny_model_dir: Path, monkeypatch, caplog) -> None:
    """The fallback used to clear the encoder's processor while worker threads still used it
    (AttributeError on later batches); every batch must now come out with the HF ids."""
    from chinese_vicuna.data import fast_tokenize
    from chinese_vicuna.data.encode import tokenize_segment_lists
    from chinese_vicuna.prompts import load_template

    tokenizer = load_tokenizer(str(tiny_model_dir))
    real = fast_tokenize._sentencepiece_for(tokenizer)
    monkeypatch.setattr(fast_tokenize, "_sentencepiece_for", lambda tok: _DisagreeingSentencepiece(real))
    texts = [f"第{i}个问题：一年有几个季节？" for i in range(120)]
    encoder = fast_tokenize.BatchEncoder(tokenizer, num_threads=3)
    with caplog.at_level("WARNING"):
        got = [ids for batch in encoder.map([texts[i : i + 4] for i in range(0, len(texts), 4)]) for ids in batch]
    assert got == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert not encoder.fast and "disagree" in caplog.text
    # the whole pipeline (threads, many small batches) gives the samples of the HF tokenizer
    template = load_template("alpaca", tokenizer)
    records = [{"instruction": t, "input": "", "output": "四个。"} for t in texts]
    segments = [template.instruction_segments(r["instruction"], r["input"], r["output"]) for r in records]
    samples = tokenize_segment_lists(tokenizer, segments, 256, add_eos=True, batch_size=3)
    monkeypatch.setattr(fast_tokenize, "_sentencepiece_for", lambda tok: None)
    assert samples == tokenize_segment_lists(tokenizer, segments, 256, add_eos=True, batch_size=3)

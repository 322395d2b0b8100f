"""generate.py file mode in length-sorted, left-padded micro-batches: the same lines as one at
a time (memorized answers exact), in input order; and the batched engine of serve.py in process:
greedy batches equal single requests, LRU eviction, queue limit, cancellation."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import pytest

from conftest import SAMPLE_INSTRUCT, read_jsonl
from serve_helpers import ANSWERS_A, ANSWERS_B, INSTRUCTIONS

PROMPTS = 64


def test_file_mode_batched_equals_one_at_a_time(tiny_model_dir: Path, two_loras: dict[str, Path], tmp_path: Path) -> None:
    import generate

    records = [{"instruction": q, "input": ""} for q in INSTRUCTIONS]
    records += [{"instruction": r["instruction"], "input": r["input"]} for r in read_jsonl(SAMPLE_INSTRUCT)[: PROMPTS - len(records)]]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    base = ["--base_model", str(tiny_model_dir), "--lora_weights", str(two_loras["a"]), "--data_file", str(data), "--max_new_tokens", "32"]
    seconds = {}
    for batch in (1, 16):
        start = time.perf_counter()
        generate.main([*base, "--output_file", str(tmp_path / f"out-{batch}.jsonl"), "--batch_size", str(batch)])
        seconds[batch] = time.perf_counter() - start
    one, batched = read_jsonl(tmp_path / "out-1.jsonl"), read_jsonl(tmp_path / "out-16.jsonl")
    assert batched == one
    assert [r["instruction"] for r in batched] == [r["instruction"] for r in records]  # input order
    assert [r["output"] for r in batched[: len(INSTRUCTIONS)]] == ANSWERS_A
    print(
        f"\nfile mode, {PROMPTS} prompts: one at a time {seconds[1]:.1f} s, batch 16 {seconds[16]:.1f} s, {seconds[1] / seconds[16]:.1f}x"
    )


@pytest.fixture(scope="module")
def registry_parts(tiny_model_dir: Path, two_loras: dict[str, Path]):
    return tiny_model_dir, {k: str(v) for k, v in two_loras.items()}


def make_engine(registry_parts, max_loras: int = 2, max_batch_size: int = 16, max_queue: int = 64):
    """A fresh base each time: loading LoRAs changes the model in place."""
    from chinese_vicuna.model.build import load_for_inference
    from chinese_vicuna.serving.adapters import AdapterRegistry
    from chinese_vicuna.serving.engine import BatchEngine

    base, loras = registry_parts
    model, tokenizer = load_for_inference(str(base))
    registry = AdapterRegistry(model, tokenizer, loras, "alpaca", max_loras)
    return BatchEngine(registry, tokenizer, max_batch_size, max_queue)


def submit(engine, model: str | None, question: str, max_tokens: int = 32):
    from chinese_vicuna.infer.generation import prompt_ids
    from chinese_vicuna.serving.engine import GenerationRequest, SamplingParams

    template = engine.registry.template(model)
    ids = prompt_ids(engine.tokenizer, template, question)
    events: queue.Queue = queue.Queue()
    request = GenerationRequest(ids, model, SamplingParams(max_tokens, 0.0, 1.0, None, template.stop_strings, template.is_chat), events.put)
    engine.submit(request)
    return request, events


def result(events: queue.Queue) -> tuple[str, str]:
    parts = []
    while True:
        event = events.get(timeout=120)
        parts.append(event.text)
        if event.finish_reason:
            return "".join(parts), event.finish_reason


def test_engine_batches_equal_single_requests_and_evicts_lru(registry_parts) -> None:
    engine = make_engine(registry_parts, max_loras=1)
    try:
        jobs = [("a", 0), ("b", 0), (None, 1), ("a", 2), ("b", 3), (None, 0), ("a", 3)]
        single = [result(submit(engine, m, INSTRUCTIONS[q])[1]) for m, q in jobs]
        handles = [submit(engine, m, INSTRUCTIONS[q])[1] for m, q in jobs]  # all at once: decoded together
        assert [result(h) for h in handles] == single
        memorized = {"a": ANSWERS_A, "b": ANSWERS_B}
        assert [text for (m, q), (text, _) in zip(jobs, single) if m] == [memorized[m][q] for m, q in jobs if m]
        assert len(engine.registry.loaded()) == 1  # --max_loras 1: the other one was evicted
        assert engine.stats()["active"] == 0
    finally:
        engine.close()


def test_engine_queue_limit_and_cancel(registry_parts) -> None:
    from chinese_vicuna.serving.engine import QueueFull

    engine = make_engine(registry_parts, max_batch_size=1, max_queue=1)
    try:
        first, first_events = submit(engine, None, INSTRUCTIONS[0], max_tokens=400)
        second, second_events = submit(engine, None, INSTRUCTIONS[1], max_tokens=400)
        with pytest.raises(QueueFull):
            submit(engine, None, INSTRUCTIONS[2])
        first.cancel()
        second.cancel()
        assert result(first_events)[1] == "cancelled" and result(second_events)[1] == "cancelled"
        deadline = time.monotonic() + 10
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["active"] == 0 and engine.stats()["cache_tokens"] == 0
        assert result(submit(engine, "a", INSTRUCTIONS[2])[1]) == (ANSWERS_A[2], "stop")
    finally:
        engine.close()


def test_prefill_groups_stay_within_the_token_budget_in_order() -> None:
    from chinese_vicuna.serving.engine import GenerationRequest, SamplingParams, prefill_groups

    requests = [GenerationRequest([1] * n, None, SamplingParams(), lambda event: None) for n in (50, 60, 40, 300, 10, 10, 100)]
    groups = prefill_groups(requests, 256)
    assert [[len(r.prompt_ids) for r in g] for g in groups] == [[50, 60, 40], [300], [10, 10], [100]]
    assert [r for g in groups for r in g] == requests

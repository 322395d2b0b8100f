"""Throughput and time-to-first-token of an OpenAI-compatible server at several concurrencies.

    python serve.py --base_model BASE --lora_modules a=LORA_A b=LORA_B &      # or vLLM / llama.cpp
    python tools/bench_serve.py --url http://127.0.0.1:8000 --models base,a,b \\
        --concurrency 1,4,16 --requests 16 --max_tokens 64 --output bench.json

For each concurrency C, the same `--requests` chat requests (models and questions rotating,
greedy, streamed) are sent by C client threads at once; it reports aggregate completion
tokens per second, requests per second, and time to first token (mean and p50 / p90), and
checks that every concurrency level returned the same answers as C = 1 (greedy batching must
not change them). `--ignore_eos`-style fixed lengths are not assumed: tokens are what the
server's usage says (or streamed chunks, where a server gives no usage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from chinese_vicuna.data.records import read_records
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import atomic_write_text

API_KEY_ENV = "CHINESE_VICUNA_API_KEY"
DEFAULT_QUESTIONS = Path(__file__).resolve().parent.parent / "sample" / "instruct" / "data_sample.jsonl"


@dataclass
class Level:
    concurrency: int
    requests: int
    failures: int
    seconds: float
    completion_tokens: int
    tokens_per_second: float
    requests_per_second: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    same_answers_as_sequential: bool | None


def one_request(client, model: str, question: str, max_tokens: int) -> tuple[str, int, float]:
    """(answer, completion tokens, seconds to the first content) of one streamed chat request."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    tokens = chunks = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
            chunks += 1
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return "".join(parts), tokens or chunks, first if first is not None else time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_level(client, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> tuple[Level, list[str | None]]:
    def work(job: tuple[str, str]) -> tuple[str, int, float] | None:
        try:
            return one_request(client, job[0], job[1], max_tokens)
        except Exception as exc:  # counted as a failure, the run goes on
            print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(work, jobs))
    seconds = time.perf_counter() - start
    done = [r for r in results if r is not None]
    tokens = sum(r[1] for r in done)
    ttfts = [r[2] for r in done] or [0.0]
    level = Level(
        concurrency=concurrency,
        requests=len(jobs),
        failures=len(jobs) - len(done),
        seconds=round(seconds, 3),
        completion_tokens=tokens,
        tokens_per_second=round(tokens / seconds, 1),
        requests_per_second=round(len(done) / seconds, 2),
        ttft_mean_s=round(statistics.mean(ttfts), 3),
        ttft_p50_s=round(percentile(ttfts, 0.5), 3),
        ttft_p90_s=round(percentile(ttfts, 0.9), 3),
        same_answers_as_sequential=None,
    )
    return level, [r[0] if r else None for r in results]


def markdown(levels: list[Level]) -> str:
    rows = [
        "| clients | requests | failures | tokens/s | requests/s | TTFT mean / p50 / p90 (s) | vs 1 client | same answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = levels[0].tokens_per_second or 1.0
    for lv in levels:
        rows.append(
            f"| {lv.concurrency} | {lv.requests} | {lv.failures} | {lv.tokens_per_second} | {lv.requests_per_second} | "
            f"{lv.ttft_mean_s} / {lv.ttft_p50_s} / {lv.ttft_p90_s} | {lv.tokens_per_second / base:.1f}× | {lv.same_answers_as_sequential} |"
        )
    return "\n".join(rows)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server root (…/v1 is added)")
    parser.add_argument("--models", required=True, help="comma list of served model names, rotated over the requests")
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of client counts")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (the same ones at every level)")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="alpaca .jsonl whose instructions are asked")
    parser.add_argument("--label", default="", help="a name for this run in the JSON (model, engine, machine)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        import openai
    except ImportError:
        raise UserError("the openai client is needed: pip install openai") from None

    questions = [r.data["instruction"] for r in read_records(args.questions) if isinstance(r.data, dict) and r.data.get("instruction")]
    if not questions:
        raise UserError(f"{args.questions}: no instructions found")
    models = [m for m in args.models.split(",") if m]
    jobs = [(models[i % len(models)], questions[i % len(questions)]) for i in range(args.requests)]
    levels_wanted = [int(c) for c in args.concurrency.split(",") if c]
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=os.environ.get(API_KEY_ENV) or "none", max_retries=0, timeout=600)
    one_request(client, jobs[0][0], jobs[0][1], 4)  # warm-up (loads a LoRA, first allocations)

    levels: list[Level] = []
    reference: list[str | None] | None = None
    for concurrency in levels_wanted:
        level, answers = run_level(client, jobs, concurrency, args.max_tokens)
        if reference is None:
            reference = answers
        level.same_answers_as_sequential = answers == reference
        levels.append(level)
        print(json.dumps(asdict(level)), flush=True)
    print(markdown(levels))
    if args.output:
        payload = {
            "label": args.label,
            "url": args.url,
            "models": models,
            "max_tokens": args.max_tokens,
            "levels": [asdict(lv) for lv in levels],
        }
        atomic_write_text(args.output, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()

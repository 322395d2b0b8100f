"""Data doctor speed on a large generated alpaca file: the whole report and the near-duplicate
search alone (docs/data.md).

The file mixes the sample instructions (`sample/instruct`, as task prompts, often with an
input) and Chinese text from a character-bigram chain trained on `sample/pretrain` (realistic
character and bigram frequencies, so unrelated prompts share common characters as real ones
do), with 1% exact repeats and 2% near repeats (copies with a few characters edited).

    python tools/make_tiny_model.py --output_dir tiny
    python tools/bench_doctor.py --base_model tiny --records 50000 --output_dir bench-doctor
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import BaseModelArguments, parse_args
from chinese_vicuna.datatools.dedupe import near_duplicate_flags, rouge_tokens
from chinese_vicuna.datatools.doctor import diagnose, duplicate_counts, write_report
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template

REPO = Path(__file__).resolve().parent.parent


@dataclass
class BenchDoctorArguments:
    output_dir: str = field(metadata={"help": "Where the data file, the report and bench.json go."})
    records: int = field(default=50000, metadata={"help": "Records in the generated file."})
    cutoff_len: int = field(default=256)
    seed: int = field(default=0)


class BigramChain:
    """Chinese-looking text: a character-bigram Markov chain over the sample pretraining texts."""

    def __init__(self, text: str, rng: random.Random) -> None:
        self.rng = rng
        nxt: dict[str, list[str]] = {}
        for a, b in itertools.pairwise(text):
            if not a.isspace() and not b.isspace():
                nxt.setdefault(a, []).append(b)
        self.next = nxt
        self.starts = [c for c in text if "\u4e00" <= c <= "\u9fff"]

    def text(self, k: int) -> str:
        c = self.rng.choice(self.starts)
        out = [c]
        while len(out) < k:
            c = self.rng.choice(self.next[c]) if c in self.next else self.rng.choice(self.starts)
            out.append(c)
        return "".join(out)


def edit(text: str, k: int, chain: BigramChain, rng: random.Random) -> str:
    """k random single-character substitutions, insertions or deletions."""
    chars = list(text)
    for _ in range(k):
        p = rng.randrange(len(chars) + 1)
        op = rng.random()
        if op < 0.4 and p < len(chars):
            chars[p] = chain.text(1)
        elif op < 0.7 or len(chars) < 4:
            chars.insert(p, chain.text(1))
        else:
            chars.pop(min(p, len(chars) - 1))
    return "".join(chars)


def make_data(path: Path, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "sample" / "pretrain").glob("*.txt")))
    chain = BigramChain(text, rng)
    tasks = [json.loads(line)["instruction"] for line in (REPO / "sample" / "instruct" / "data_sample.jsonl").open(encoding="utf-8")]
    records: list[dict[str, str]] = []
    planted = {"exact": 0, "near": 0}
    while len(records) < n:
        r = rng.random()
        if records and r < 0.01:
            records.append(dict(rng.choice(records)))
            planted["exact"] += 1
            continue
        if records and r < 0.03:
            src = rng.choice(records)
            instruction = src["instruction"]
            k = rng.randint(1, max(1, len(instruction) // 5))
            records.append(
                {"instruction": edit(instruction, k, chain, rng), "input": src["input"], "output": chain.text(rng.randint(20, 300))}
            )
            planted["near"] += 1
            continue
        if r < 0.45:
            rec = {"instruction": chain.text(rng.randint(8, 40)) + "？", "input": ""}
        elif r < 0.85:
            rec = {"instruction": rng.choice(tasks), "input": chain.text(rng.randint(15, 150))}
        else:
            rec = {"instruction": rng.choice(tasks)[:-1] + "，" + chain.text(rng.randint(5, 30)) + "。", "input": ""}
        rec["output"] = chain.text(rng.randint(20, 300))
        records.append(rec)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return planted


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    base, args = parse_args((BaseModelArguments, BenchDoctorArguments), argv)
    configure_logging(logging.WARNING)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"data-{args.records}-{args.seed}.jsonl"
    planted = make_data(data, args.records, args.seed) if not data.is_file() else None
    tokenizer = load_tokenizer(base.require_base_model("a tokenizer folder (e.g. from tools/make_tiny_model.py)"))
    template = load_template("alpaca", tokenizer)

    start, cpu = time.perf_counter(), time.process_time()
    report, lengths = diagnose(data, tokenizer, template, args.cutoff_len)
    write_report(report, lengths, out / "report")
    whole, whole_cpu = time.perf_counter() - start, time.process_time() - cpu

    # The near-duplicate stage alone, on the same prompts the doctor compares.
    items = [json.loads(line) for line in data.open(encoding="utf-8")]
    for item in items:
        item.setdefault("input", "")
    start = time.perf_counter()
    texts = [rouge_tokens(r["instruction"] + "\n" + r["input"]) for r in items]
    exact, _ = duplicate_counts("instruct", items, None)
    tokenized = time.perf_counter() - start
    keys = set()
    skip = []
    for r in items:
        key = json.dumps(r, ensure_ascii=False, sort_keys=True)
        skip.append(key in keys)
        keys.add(key)
    start, cpu = time.perf_counter(), time.process_time()
    flags = near_duplicate_flags(texts, 0.7, skip)
    near, near_cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {
        "records": len(items),
        "planted": planted,
        "duplicates": exact,
        "near_duplicates": sum(flags),
        "report_seconds": round(whole, 2),
        "report_cpu_seconds": round(whole_cpu, 2),
        "near_duplicate_seconds": round(near, 2),
        "near_duplicate_cpu_seconds": round(near_cpu, 2),
        "rouge_tokens_seconds": round(tokenized, 2),
        "load_average": os.getloadavg()[0],  # other jobs on the machine: wall times stretch, CPU times less
    }
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

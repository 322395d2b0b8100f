"""tools/data_doctor.py: duplicate, near-duplicate, truncation and no-trainable counts equal an
independent count; chat data; report files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from chinese_vicuna.data.chat import tokenize_conversations
from chinese_vicuna.data.encode import TokenizeStats, tokenize_instructions
from chinese_vicuna.data.formats import read_conversations
from chinese_vicuna.datatools.dedupe import rouge_l, rouge_tokens
from chinese_vicuna.datatools.doctor import diagnose, language_of, percentiles
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import SAMPLE_INSTRUCT, read_jsonl, run_script

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def independent_length(tokenizer, template, rec: dict) -> int:
    """[bos] + prompt + answer + [eos]: the answer continues the prompt's text (design.md, prefix
    consistency), so with alpaca's prompt ending in a newline the ids are those of the joined text."""
    prompt = template.instruction_prompt(rec["instruction"], rec["input"])
    return 1 + len(tokenizer(prompt + rec["output"], add_special_tokens=False)["input_ids"]) + 1


@pytest.fixture(scope="module")
def messy_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Sample instructions, some answers made long, exact repeats, near repeats, one invalid line."""
    rng = random.Random(7)
    base = read_jsonl(SAMPLE_INSTRUCT)[:40]
    records = []
    for i, r in enumerate(base):
        r = dict(r)
        if i % 3 == 0:
            r["output"] = r["output"] * (2 + i % 5)
        records.append(r)
    records += [dict(records[i]) for i in rng.sample(range(len(records)), 6)]  # exact repeats
    records += [{**records[i], "instruction": records[i]["instruction"][:-1] + "呀？", "output": "另一个回答。"} for i in (1, 4, 7)]
    rng.shuffle(records)
    path = tmp_path_factory.mktemp("doctor") / "messy.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(5, json.dumps({"instruction": "缺少输出"}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, records


def test_counts_equal_an_independent_count(tokenizer, messy_data, tmp_path: Path) -> None:
    path, records = messy_data
    template = load_template("alpaca", tokenizer)
    lengths = [independent_length(tokenizer, template, r) for r in records]
    cutoff = sorted(lengths)[len(lengths) * 2 // 3] - 1  # one sample is exactly one token (its EOS) too long
    report, _ = diagnose(path, tokenizer, template, cutoff)

    keys = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]
    assert report["records"] == len(records) + 1 and report["invalid_records"] == 1
    assert report["invalid_reasons"] == {"missing field 'output' (an alpaca record needs 'instruction' and 'output')": 1}
    assert report["duplicates"] == len(keys) - len(set(keys)) == 6
    assert report["truncated"] == sum(n > cutoff for n in lengths) > 0
    # brute-force near duplicates among the first occurrences: prompts with ROUGE-L >= 0.7 to an earlier kept one
    kept, near, seen = [], 0, set()
    for r, k in zip(records, keys):
        if k in seen:
            continue
        seen.add(k)
        toks = rouge_tokens(r["instruction"] + "\n" + r["input"])
        if any(rouge_l(toks, o) >= 0.7 for o in kept):
            near += 1
        else:
            kept.append(toks)
    assert report["near_duplicates"] == near >= 3
    # and training's own count agrees
    stats = TokenizeStats()
    tokenize_instructions(records, tokenizer, template, cutoff, stats=stats)
    assert report["truncated"] == stats.truncated and report["no_trainable"] == stats.dropped_no_trainable
    assert report["tokens"]["whole"]["max"] == max(lengths)
    assert report["longest"][0]["tokens"] == max(lengths) and report["longest"][0]["where"].startswith(str(path))

    def mostly_chinese(r: dict) -> bool:
        text = "".join(r.values())
        return sum("\u4e00" <= c <= "\u9fff" for c in text) >= sum(c.isascii() and c.isalpha() for c in text)

    assert report["language_mix"]["chinese"] == round(sum(map(mostly_chinese, records)) / len(records), 4) > 0.5


def test_no_trainable_when_the_prompt_fills_the_cutoff(tokenizer, tmp_path: Path) -> None:
    template = load_template("alpaca", tokenizer)
    records = [{"instruction": "请" * 60, "input": "", "output": "好。"}, {"instruction": "短", "input": "", "output": "好。"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    cutoff = 1 + len(
        tokenizer(template.instruction_prompt(records[0]["instruction"]), add_special_tokens=False)["input_ids"]
    )  # BOS + prompt
    report, _ = diagnose(path, tokenizer, template, cutoff)
    stats = TokenizeStats()
    tokenize_instructions(records, tokenizer, template, cutoff, stats=stats)
    assert report["no_trainable"] == stats.dropped_no_trainable == 1 and report["truncated"] == 1


def test_chat_data_counts_the_samples_training_makes(tokenizer) -> None:
    path = REPO / "sample" / "chat" / "chat_sample.jsonl"
    template = load_template("chinese-vicuna-chat", tokenizer)
    cutoff = 64
    report, lengths = diagnose(path, tokenizer, template, cutoff)
    stats = TokenizeStats()
    samples = tokenize_conversations(read_conversations(path), tokenizer, template, cutoff, stats=stats)
    assert report["kind"] == "chat" and report["records"] == 24
    assert report["samples"] == len(samples) + stats.dropped_no_trainable == sum(lengths.values())  # {length: samples}
    assert report["split"]["conversations_split"] == stats.extra["conversations split at turn boundaries"] > 0
    assert report["truncated"] == stats.truncated and report["no_trainable"] == stats.dropped_no_trainable
    assert set(report["tokens"]) == {"prompt", "answer", "whole", "user_turn", "assistant_turn"}


def test_helpers() -> None:
    assert percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == {"p50": 5, "p90": 9, "p95": 10, "p99": 10, "mean": 5.5, "max": 10}
    assert [language_of(t) for t in ("你好，世界", "hello world", "Привет", "123")] == ["chinese", "english", "other", "other"]


def test_cli_writes_the_report_files(tiny_model_dir: Path, messy_data, tmp_path: Path) -> None:
    path, _ = messy_data
    out = tmp_path / "doctor"
    proc = run_script("tools/data_doctor.py", "--data_path", str(path), "--base_model", str(tiny_model_dir), "--cutoff_len", "48",
                      "--output_dir", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key in ("records", "duplicates", "near_duplicates", "truncated", "no_trainable", "tokens", "language_mix", "longest"):
        assert key in report
    assert report["template"] == "alpaca" and report["duplicates"] == 6
    assert (out / "length_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"| truncated | {report['truncated']} |" in md and "length_histogram.png" in md
    assert f"{report['truncated']} of {report['samples']} samples longer than 48 tokens" in proc.stdout


def test_batch_near_duplicates_agree_with_brute_force() -> None:
    """near_duplicate_flags (the doctor's numpy search) against comparing with every kept text."""
    from chinese_vicuna.datatools.dedupe import near_duplicate_flags

    rng = random.Random(3)
    base = [[rng.choice("abcdefghij") for _ in range(rng.randint(1, 25))] for _ in range(150)]
    texts = []
    for _ in range(800):  # edited copies make many pairs near the threshold
        t = list(rng.choice(base))
        for _ in range(rng.randint(0, 6)):
            p = rng.randrange(len(t) + 1)
            if rng.random() < 0.5:
                t.insert(p, rng.choice("abcdefghij"))
            elif t:
                t.pop(min(p, len(t) - 1))
        texts.append(t)
    skip = [rng.random() < 0.1 for _ in texts]
    flags = near_duplicate_flags(texts, 0.7, skip)
    kept, expected = [], []
    for t, s in zip(texts, skip, strict=True):
        near = not s and bool(t) and any(rouge_l(t, k) >= 0.7 for k in kept)
        expected.append(near)
        if not s and t and not near:
            kept.append(t)
    assert flags == expected and 100 < sum(flags) < 700

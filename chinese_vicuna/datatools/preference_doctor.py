"""Preference-data checks for tools/data_doctor.py: records that are not valid pairs (empty
answers among them), identical chosen and rejected answers, pairs that truncation leaves
identical or drops, duplicate prompts, and length bias between chosen and rejected (a DPO model
learns "longer is better" from data where the chosen answer is longer most of the time)."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from chinese_vicuna.data.encode import TokenizeStats
from chinese_vicuna.data.preference import PREFERENCE_FORMATS, PreferenceExample, to_example, tokenize_examples
from chinese_vicuna.data.records import data_files, iter_records
from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.prompts import PromptTemplate

PREFERENCE_KEYS = {"chosen", "kto_tag", "completion"}


def is_preference_data(data_path: str | os.PathLike) -> bool:
    """Whether the first record of the data is a preference record (pairs or KTO)."""
    first = next(iter_records(data_files(data_path)[0]))
    return isinstance(first.data, dict) and bool(PREFERENCE_KEYS & set(first.data))


def diagnose_preferences(data_path: str | os.PathLike, tokenizer: Any, template: PromptTemplate, cutoff_len: int) -> dict[str, Any]:
    """Counts and examples of what would weaken preference training, as a report dict."""
    examples: list[PreferenceExample] = []
    invalid: Counter = Counter()
    invalid_examples: list[str] = []
    formats: Counter = Counter()
    for path in data_files(data_path):
        for record in iter_records(path):
            try:
                example = to_example(record)
            except UserError as exc:
                reason = str(exc).split(": ", 1)[-1]
                invalid[reason.split(";")[0]] += 1
                invalid_examples.append(str(exc))
                continue
            formats[next(f.name for f in PREFERENCE_FORMATS.values() if f.detect(record.data))] += 1
            examples.append(example)
    pairs = [ex for ex in examples if len(ex.answers) == 2]
    identical = [ex.where for ex in pairs if ex.answers[0].strip() == ex.answers[1].strip()]
    prompts = Counter(json.dumps(ex.prompt, ensure_ascii=False) for ex in examples)
    stats = TokenizeStats()
    tokenized = tokenize_examples(pairs, tokenizer, template, cutoff_len, stats) if pairs else []
    lengths = [(len(g[0]["input_ids"]), len(g[1]["input_ids"])) for g in tokenized]
    longer = sum(c > r for c, r in lengths)
    return {
        "data_path": str(data_path),
        "template": template.name,
        "cutoff_len": cutoff_len,
        "records": len(examples) + sum(invalid.values()),
        "formats": dict(formats),
        "pairs": len(pairs),
        "kto_samples": len(examples) - len(pairs),
        "invalid_records": sum(invalid.values()),
        "invalid_reasons": dict(invalid),
        "invalid_examples": invalid_examples[:5],
        "identical_answers": len(identical),
        "identical_examples": identical[:5],
        "duplicate_prompts": sum(n - 1 for n in prompts.values() if n > 1),
        "truncated": stats.truncated,
        "dropped_by_truncation_or_identical_tokens": dict(stats.extra),
        "chosen_longer_share": round(longer / len(lengths), 3) if lengths else None,
        "mean_tokens": {
            "chosen": round(statistics.fmean(c for c, _ in lengths), 1) if lengths else None,
            "rejected": round(statistics.fmean(r for _, r in lengths), 1) if lengths else None,
        },
    }


def preference_report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Preference data report: {report['data_path']}",
        "",
        f"template `{report['template']}`, cutoff_len {report['cutoff_len']}; formats: "
        + ", ".join(f"{k} {v}" for k, v in report["formats"].items()),
        "",
        "| | count |",
        "|---|---|",
    ]
    for key in ("records", "pairs", "kto_samples", "invalid_records", "identical_answers", "duplicate_prompts", "truncated"):
        lines.append(f"| {key} | {report[key]} |")
    for what, n in report["dropped_by_truncation_or_identical_tokens"].items():
        lines.append(f"| {what} | {n} |")
    share = report["chosen_longer_share"]
    if share is not None:
        lines += ["", f"Chosen longer than rejected in {share:.0%} of pairs (mean tokens {report['mean_tokens']})."]
        if share >= 0.8 or share <= 0.2:
            lines.append("Length bias: the model may learn answer length instead of quality; balance lengths or use SimPO / IPO.")
    if report["invalid_reasons"]:
        lines += ["", "## Invalid records", ""] + [f"- {x}" for x in report["invalid_examples"]]
    return "\n".join(lines) + "\n"


def write_preference_report(report: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    atomic_write_text(out / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "report.md", preference_report_markdown(report))
    return out

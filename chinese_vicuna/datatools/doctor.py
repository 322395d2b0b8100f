"""A report on a data file before training: duplicates, near duplicates, truncation at the
cutoff, samples with nothing to train, token-length percentiles, language mix, longest records.

Token counts come from the training code itself (chinese_vicuna.data / chat_data): records are
rendered with the template and tokenized exactly as finetune.py / finetune_chat.py do, BOS and
the trained EOS included, and chat conversations are split at turn boundaries by the same plan,
so `truncated` and `no_trainable` are the numbers training will log.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.data.chat import conversation_segment_lists, template_trains_eos
from chinese_vicuna.data.encode import IGNORE_INDEX, TokenizeStats, tokenize_instructions, tokenize_segment_lists
from chinese_vicuna.data.formats import Conversation, check_messages, detect_format, to_messages
from chinese_vicuna.data.records import Record, data_files, read_records, validate_instruction
from chinese_vicuna.datatools.dedupe import near_duplicate_flags, rouge_tokens
from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text, save_figure

logger = logging.getLogger(__name__)

# Tokenize without truncation to see whole lengths; the cutoff is applied when counting.
NO_CUTOFF = 1 << 40
PERCENTILES = (50, 90, 95, 99)
LONGEST_SHOWN = 5


def percentiles(values: Sequence[int]) -> dict[str, float]:
    """p50/p90/p95/p99 (nearest rank), mean and max of token counts."""
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)
    out: dict[str, float] = {f"p{p}": ordered[min(n - 1, max(0, -(-p * n // 100) - 1))] for p in PERCENTILES}
    out["mean"] = round(sum(ordered) / n, 1)
    out["max"] = ordered[-1]
    return out


def languages_of(texts: Sequence[str]) -> list[str]:
    """`language_of` for many texts in one numpy pass over their code points (a Python loop over
    every character was a large part of the report's time on big files)."""
    import numpy as np

    if not texts:
        return []
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    cjk = ((cp >= 0x4E00) & (cp <= 0x9FFF)) | ((cp >= 0x3400) & (cp <= 0x4DBF))
    latin = ((cp | 0x20) >= ord("a")) & ((cp | 0x20) <= ord("z"))  # ASCII letters
    beyond = (cp > 0x7F) & ~cjk
    distinct = np.unique(cp[beyond])
    letters = distinct[np.array([chr(c).isalpha() for c in distinct.tolist()], dtype=bool)]
    other = beyond & np.isin(cp, letters)
    ends = np.cumsum([len(t) for t in texts])
    starts = ends - np.array([len(t) for t in texts])

    def per_text(mask: Any) -> Any:
        total = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        return total[ends] - total[starts]

    out = []
    for c, la, o in zip(per_text(cjk).tolist(), per_text(latin).tolist(), per_text(other).tolist(), strict=True):
        if not (c or la or o):
            out.append("other")
        elif c >= la and c >= o:
            out.append("chinese")
        else:
            out.append("english" if la >= o else "other")
    return out


def language_of(text: str) -> str:
    """chinese, english or other: the script with the most characters (CJK vs Latin letters vs other letters)."""
    return languages_of([text])[0]


def label_stats(label_lists: Sequence[Sequence[int]], cutoff_len: int) -> tuple[list[int], list[int], list[int], list[int], int]:
    """(untrained tokens per sample, trained tokens per sample, lengths of every untrained run
    (prompt / user turn), of every trained run (answer), samples with no trained token in their
    first cutoff_len labels), for all samples in one numpy pass."""
    import numpy as np

    lens = np.array([len(labels) for labels in label_lists], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(label_lists), dtype=np.int64, count=int(lens.sum()))
    trained = flat != IGNORE_INDEX
    ends = np.cumsum(lens)
    starts = ends - lens
    count = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
    answer = count[ends] - count[starts]
    # a run starts at each sample's first label and wherever trained and untrained alternate
    run_start = np.zeros(len(flat), dtype=bool)
    run_start[starts[lens > 0]] = True
    run_start[1:] |= trained[1:] != trained[:-1]
    first = np.flatnonzero(run_start)
    runs = np.diff(np.append(first, len(flat)))
    kind = trained[first]
    head = count[starts + np.minimum(lens, cutoff_len)] - count[starts]
    return (lens - answer).tolist(), answer.tolist(), runs[~kind].tolist(), runs[kind].tolist(), int((head == 0).sum())


@dataclass
class _Read:
    kind: str  # instruct or chat
    items: list[Any]  # alpaca dicts or Conversations
    wheres: list[str]
    invalid: Counter[str]
    invalid_examples: list[str]


def data_kind(data_path: str | os.PathLike) -> str:
    """chat or instruct, by the first record of the first file."""
    first = read_records(data_files(data_path)[0])[0].data
    return "chat" if detect_format(first) is not None else "instruct"


def _read(files: Sequence[Path]) -> _Read:
    records: list[Record] = [r for path in files for r in read_records(path)]
    kind = "chat" if detect_format(records[0].data) is not None else "instruct"
    items: list[Any] = []
    wheres: list[str] = []
    invalid: Counter[str] = Counter()
    examples: list[str] = []
    for record in records:
        try:
            if kind == "instruct":
                items.append(validate_instruction(record))
            else:
                fmt = detect_format(record.data)
                if fmt is None:
                    raise UserError(f"{record.where}: not a conversation in a known format")
                messages, _ = check_messages(to_messages(record, fmt), record.where)
                items.append(Conversation(messages, record.where))
            wheres.append(record.where)
        except UserError as exc:
            message = str(exc)
            invalid[message.split(": ", 1)[-1]] += 1
            if len(examples) < 10:
                examples.append(message)
    return _Read(kind, items, wheres, invalid, examples)


def _text_of(kind: str, item: Any) -> str:
    if kind == "instruct":
        return item["instruction"] + "\n" + item["input"] + "\n" + item["output"]
    return "\n".join(m["content"] for m in item.messages)


def _prompt_key(kind: str, item: Any) -> str:
    """What near duplicates are judged on: the instruction and input, or every user turn."""
    if kind == "instruct":
        return item["instruction"] + "\n" + item["input"]
    return "\n".join(m["content"] for m in item.messages if m["role"] != "assistant")


def duplicate_counts(kind: str, items: Sequence[Any], threshold: float | None = 0.7) -> tuple[int, int | None]:
    """(records that repeat an earlier record exactly, records whose prompt has ROUGE-L >= threshold
    with an earlier non-duplicate record's prompt; None when threshold is None)."""
    seen: set[str] = set()
    repeats = []
    for item in items:
        key = json.dumps(item if kind == "instruct" else item.messages, ensure_ascii=False, sort_keys=True)
        repeats.append(key in seen)
        seen.add(key)
    if threshold is None:
        return sum(repeats), None
    near = near_duplicate_flags([rouge_tokens(_prompt_key(kind, item)) for item in items], threshold, skip=repeats)
    return sum(repeats), sum(near)


def diagnose(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: Any,
    cutoff_len: int,
    threshold: float | None = 0.7,
) -> tuple[dict[str, Any], list[int]]:
    """(the report, every sample's whole token length) of a data file or folder.

    `threshold` None skips the near-duplicate search (the slowest part on large files).
    """
    files = data_files(data_path)
    read = _read(files)
    if not read.items:
        raise UserError(f"{data_path}: no valid record ({', '.join(f'{k}: {v}' for k, v in read.invalid.items())})")
    kind, items = read.kind, read.items
    stats = TokenizeStats()
    if kind == "instruct":
        samples = tokenize_instructions(items, tokenizer, template, NO_CUTOFF, stats=stats)
        sample_where = list(read.wheres)
        split_info: dict[str, int] = {}
        add_eos = not template.is_chat
    else:
        if not template.is_chat:
            raise UserError(f"--prompt_template {template.name}: chat data needs a chat template")
        add_eos = not template_trains_eos(template, tokenizer)
        # The split plan training makes at this cutoff, then whole lengths of its samples.
        plan_stats = TokenizeStats()
        segment_lists = conversation_segment_lists(items, tokenizer, template, cutoff_len, add_eos, stats=plan_stats)
        samples = tokenize_segment_lists(tokenizer, segment_lists, NO_CUTOFF, add_eos, stats=stats)
        sample_where = _split_wheres(items, segment_lists, template)
        split_info = {
            "conversations": len(items),
            "samples": len(segment_lists),
            "conversations_split": plan_stats.extra.get("conversations split at turn boundaries", 0),
        }
    empty = stats.dropped_no_trainable  # no trainable token even untruncated (rare: empty answers)
    if empty:
        logger.warning("%d samples have no trainable token even before truncation", empty)
        sample_where = sample_where[: len(samples)]  # positions of the longest records may shift by those

    lengths = [len(s["input_ids"]) for s in samples]
    prompt_lens, answer_lens, turn_prompt, turn_answer, no_trainable = label_stats([s["labels"] for s in samples], cutoff_len)
    no_trainable += empty
    duplicates, near = duplicate_counts(kind, items, threshold)
    languages = Counter(languages_of([_text_of(kind, item) for item in items]))
    total = len(items)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:LONGEST_SHOWN]
    report: dict[str, Any] = {
        "data_path": str(data_path),
        "kind": kind,
        "template": template.name,
        "cutoff_len": cutoff_len,
        "records": total + sum(read.invalid.values()),
        "valid_records": total,
        "invalid_records": sum(read.invalid.values()),
        "invalid_reasons": dict(read.invalid),
        "invalid_examples": read.invalid_examples,
        "duplicates": duplicates,
        "near_duplicates": near,
        "near_duplicate_rule": (
            f"ROUGE-L >= {threshold} between prompts (instruction + input; user turns for chat)" if threshold is not None else "not checked"
        ),
        "samples": len(samples) + empty,
        "truncated": sum(1 for n in lengths if n > cutoff_len),
        "no_trainable": no_trainable,
        "tokens": {"prompt": percentiles(prompt_lens), "answer": percentiles(answer_lens), "whole": percentiles(lengths)},
        "language_mix": {lang: round(languages.get(lang, 0) / total, 4) for lang in ("chinese", "english", "other")},
        "longest": [{"where": sample_where[i], "tokens": lengths[i]} for i in order if i < len(sample_where)],
    }
    if kind == "chat":
        report["split"] = split_info
        report["tokens"]["user_turn"] = percentiles(turn_prompt)
        report["tokens"]["assistant_turn"] = percentiles(turn_answer)
    return report, lengths


def _split_wheres(conversations: Sequence[Conversation], segment_lists: Sequence[Any], template: Any) -> list[str]:
    """Where each sample came from: conversation_segment_lists keeps conversation order, one or
    more samples each; a sample opens a new conversation when its first answer text is that
    conversation's first answer."""
    wheres: list[str] = []
    ci = -1
    for segs in segment_lists:
        first_answer = next((s.text for s in segs if s.trainable), None)
        nxt = ci + 1
        if nxt < len(conversations):
            answers = [m["content"] for m in conversations[nxt].messages if m["role"] == "assistant"]
            if ci < 0 or (first_answer is not None and answers and answers[0] in first_answer):
                ci = nxt
        wheres.append(conversations[max(ci, 0)].where)
    return wheres


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown page."""
    t = report["tokens"]
    lines = [
        f"# Data report: {report['data_path']}",
        "",
        f"{report['kind']} data, template `{report['template']}`, cutoff_len {report['cutoff_len']}.",
        "",
        "| | count |",
        "|---|---|",
    ]
    for key in ("records", "invalid_records", "duplicates", "near_duplicates", "samples", "truncated", "no_trainable"):
        lines.append(f"| {key} | {report[key]} |")
    lines += ["", "## Token lengths", "", "| | " + " | ".join(t["whole"]) + " |", "|---|" + "---|" * len(t["whole"])]
    for name, values in t.items():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in values.values()) + " |")
    mix = ", ".join(f"{k} {v:.1%}" for k, v in report["language_mix"].items())
    lines += ["", f"Language mix: {mix}.", "", "## Longest samples", ""]
    lines += [f"- {x['where']}: {x['tokens']} tokens" for x in report["longest"]]
    if report.get("split"):
        s = report["split"]
        lines += [
            "",
            f"{s['conversations_split']} of {s['conversations']} conversations are split at turn boundaries → {s['samples']} samples.",
        ]
    if report["invalid_reasons"]:
        lines += ["", "## Invalid records", ""] + [f"- {k}: {v}" for k, v in report["invalid_reasons"].items()]
    lines += ["", "![token lengths](length_histogram.png)", ""]
    return "\n".join(lines)


def plot_lengths(lengths: Sequence[int], cutoff_len: int, path: str | os.PathLike) -> None:
    """Histogram of whole-sample token lengths with the cutoff as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="tab:blue", alpha=0.8)
    ax.axvline(cutoff_len, color="tab:red", linestyle="--", label=f"cutoff_len {cutoff_len}")
    over = sum(1 for n in lengths if n > cutoff_len)
    ax.set_title(f"{len(lengths)} samples, {over} longer than the cutoff")
    ax.set_xlabel("tokens per sample (BOS and EOS included)")
    ax.set_ylabel("samples")
    ax.legend()
    save_figure(fig, path)


def write_report(report: dict[str, Any], lengths: Sequence[int], output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    atomic_write_text(out / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(report))
    plot_lengths(lengths, report["cutoff_len"], out / "length_histogram.png")
    return out

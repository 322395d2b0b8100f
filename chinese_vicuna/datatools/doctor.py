"""A report on a data file before training: duplicates, near duplicates, truncation at the
cutoff, samples with nothing to train, token-length percentiles, language mix, longest records.

Token counts come from the training code itself (chinese_vicuna.data / chat_data): records are
rendered with the template and tokenized exactly as finetune.py / finetune_chat.py do, BOS and
the trained EOS included, and chat conversations are split at turn boundaries by the same plan,
so `truncated` and `no_trainable` are the numbers training will log.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chinese_vicuna.data.chat import conversation_segment_lists, template_trains_eos
from chinese_vicuna.data.encode import IGNORE_INDEX, TokenizeStats, tokenize_instructions, tokenize_segment_lists
from chinese_vicuna.data.formats import Conversation, check_messages, detect_format, to_messages
from chinese_vicuna.data.records import Record, data_files, iter_records, validate_instruction
from chinese_vicuna.datatools.dedupe import NearDuplicateWindow, near_duplicate_flags, rouge_tokens
from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text, save_figure

logger = logging.getLogger(__name__)

# Tokenize without truncation to see whole lengths; the cutoff is applied when counting.
NO_CUTOFF = 1 << 40
PERCENTILES = (50, 90, 95, 99)
LONGEST_SHOWN = 5
CHUNK_RECORDS = 512  # records validated, tokenized and counted together: what the doctor holds at once (their minhash rows the most)
NEAR_DUPLICATE_WINDOW = 10_000  # kept prompts each prompt is compared with, at least: about 10 KB each (datatools/dedupe.py)


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


def data_kind(data_path: str | os.PathLike) -> str:
    """chat or instruct, by the first record of the first file."""
    first = next(iter_records(data_files(data_path)[0])).data
    return "chat" if detect_format(first) is not None else "instruct"


def _chunks(files: Sequence[Path], size: int) -> Iterator[list[Record]]:
    """The records of every file in lists of `size`, read as they are needed (streamed)."""
    records = (r for path in files for r in iter_records(path))
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _text_of(kind: str, item: Any) -> str:
    if kind == "instruct":
        return item["instruction"] + "\n" + item["input"] + "\n" + item["output"]
    return "\n".join(m["content"] for m in item.messages)


def _prompt_key(kind: str, item: Any) -> str:
    """What near duplicates are judged on: the instruction and input, or every user turn."""
    if kind == "instruct":
        return item["instruction"] + "\n" + item["input"]
    return "\n".join(m["content"] for m in item.messages if m["role"] != "assistant")


def percentiles_of_counts(counts: Counter[int]) -> dict[str, float]:
    """`percentiles` of the values counted in `counts` ({value: how many}): memory by distinct values."""
    n = sum(counts.values())
    if not n:
        return {}
    ordered = sorted(counts.items())
    ranks = {p: min(n - 1, max(0, -(-p * n // 100) - 1)) for p in PERCENTILES}
    out: dict[str, float] = {}
    seen = 0
    for value, count in ordered:
        for p, rank in ranks.items():
            if f"p{p}" not in out and rank < seen + count:
                out[f"p{p}"] = value
        seen += count
    out = {f"p{p}": out[f"p{p}"] for p in PERCENTILES}
    out["mean"] = round(sum(v * c for v, c in ordered) / n, 1)
    out["max"] = ordered[-1][0]
    return out


@dataclass
class _Tally:
    """What the report counts, added up one chunk of records at a time."""

    kind: str
    valid: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    invalid_examples: list[str] = field(default_factory=list)
    samples: int = 0
    no_trainable: int = 0
    lengths: Counter[int] = field(default_factory=Counter)
    tokens: dict[str, Counter[int]] = field(
        default_factory=lambda: {k: Counter() for k in ("prompt", "answer", "user_turn", "assistant_turn")}
    )
    languages: Counter[str] = field(default_factory=Counter)
    longest: list[tuple[int, int, str]] = field(default_factory=list)  # a heap of (tokens, -sample number, where)
    seen: set[bytes] = field(default_factory=set)  # a 16-byte digest per distinct record
    duplicates: int = 0
    near: int = 0
    conversations_split: int = 0
    split_samples: int = 0  # chat: the samples conversations are split into


def _valid_items(chunk: Sequence[Record], tally: _Tally) -> tuple[list[Any], list[str]]:
    items: list[Any] = []
    wheres: list[str] = []
    for record in chunk:
        try:
            if tally.kind == "instruct":
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
            tally.invalid[message.split(": ", 1)[-1]] += 1
            if len(tally.invalid_examples) < 10:
                tally.invalid_examples.append(message)
    return items, wheres


def _repeats(kind: str, items: Sequence[Any], seen: set[bytes]) -> list[bool]:
    """Whether each record repeats an earlier one exactly (by a digest of its content: memory per record, not per byte)."""
    repeats = []
    for item in items:
        key = json.dumps(item if kind == "instruct" else item.messages, ensure_ascii=False, sort_keys=True)
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        repeats.append(digest in seen)
        seen.add(digest)
    return repeats


def duplicate_counts(kind: str, items: Sequence[Any], threshold: float | None = 0.7) -> tuple[int, int | None]:
    """(records that repeat an earlier record exactly, records whose prompt has ROUGE-L >= threshold
    with an earlier non-duplicate record's prompt; None when threshold is None)."""
    repeats = _repeats(kind, items, set())
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
    near_duplicate_window: int = NEAR_DUPLICATE_WINDOW,
    chunk_records: int = CHUNK_RECORDS,
) -> tuple[dict[str, Any], Counter[int]]:
    """(the report, how many samples have each whole token length) of a data file or folder.

    The records are streamed `chunk_records` at a time: memory is bounded by the chunk, the
    near-duplicate window and the distinct lengths, not by the file's size (an exact-duplicate
    digest per record aside). `threshold` None skips the near-duplicate search; each prompt is
    compared with at least the last `near_duplicate_window` kept ones (all of them in smaller files).
    """
    files = data_files(data_path)
    tally: _Tally | None = None
    window = NearDuplicateWindow(threshold, near_duplicate_window) if threshold is not None else None
    add_eos = not template.is_chat
    for chunk in _chunks(files, chunk_records):
        if tally is None:
            tally = _Tally("chat" if detect_format(chunk[0].data) is not None else "instruct")
            if tally.kind == "chat":
                if not template.is_chat:
                    raise UserError(f"--prompt_template {template.name}: chat data needs a chat template")
                add_eos = not template_trains_eos(template, tokenizer)
        items, wheres = _valid_items(chunk, tally)
        if items:
            _count_chunk(tally, items, wheres, tokenizer, template, cutoff_len, add_eos, window)
    if tally is None or not tally.valid:
        invalid = tally.invalid if tally is not None else {}
        raise UserError(f"{data_path}: no valid record ({', '.join(f'{k}: {v}' for k, v in invalid.items())})")
    if window is not None and window.rotations:
        logger.info("near duplicates: each prompt was compared with at least the %d kept before it", near_duplicate_window)
    total = tally.valid
    report: dict[str, Any] = {
        "data_path": str(data_path),
        "kind": tally.kind,
        "template": template.name,
        "cutoff_len": cutoff_len,
        "records": total + sum(tally.invalid.values()),
        "valid_records": total,
        "invalid_records": sum(tally.invalid.values()),
        "invalid_reasons": dict(tally.invalid),
        "invalid_examples": tally.invalid_examples,
        "duplicates": tally.duplicates,
        "near_duplicates": tally.near if window is not None else None,
        "near_duplicate_rule": (
            f"ROUGE-L >= {threshold} between prompts (instruction + input; user turns for chat)" if threshold is not None else "not checked"
        ),
        "samples": tally.samples,
        "truncated": sum(c for n, c in tally.lengths.items() if n > cutoff_len),
        "no_trainable": tally.no_trainable,
        "tokens": {
            "prompt": percentiles_of_counts(tally.tokens["prompt"]),
            "answer": percentiles_of_counts(tally.tokens["answer"]),
            "whole": percentiles_of_counts(tally.lengths),
        },
        "language_mix": {lang: round(tally.languages.get(lang, 0) / total, 4) for lang in ("chinese", "english", "other")},
        "longest": [{"where": where, "tokens": n} for n, _, where in sorted(tally.longest, key=lambda x: (-x[0], -x[1]))],
    }
    if tally.kind == "chat":
        report["split"] = {"conversations": total, "samples": tally.split_samples, "conversations_split": tally.conversations_split}
        report["tokens"]["user_turn"] = percentiles_of_counts(tally.tokens["user_turn"])
        report["tokens"]["assistant_turn"] = percentiles_of_counts(tally.tokens["assistant_turn"])
    return report, tally.lengths


def _count_chunk(
    tally: _Tally,
    items: list[Any],
    wheres: list[str],
    tokenizer: Any,
    template: Any,
    cutoff_len: int,
    add_eos: bool,
    window: NearDuplicateWindow | None,
) -> None:
    kind = tally.kind
    stats = TokenizeStats()
    if kind == "instruct":
        samples = tokenize_instructions(items, tokenizer, template, NO_CUTOFF, stats=stats)
        sample_where = list(wheres)
    else:
        # The split plan training makes at this cutoff, then whole lengths of its samples.
        plan_stats = TokenizeStats()
        segment_lists = conversation_segment_lists(items, tokenizer, template, cutoff_len, add_eos, stats=plan_stats)
        samples = tokenize_segment_lists(tokenizer, segment_lists, NO_CUTOFF, add_eos, stats=stats)
        sample_where = _split_wheres(items, segment_lists, template)
        tally.conversations_split += plan_stats.extra.get("conversations split at turn boundaries", 0)
        tally.split_samples += len(segment_lists)
    empty = stats.dropped_no_trainable  # no trainable token even untruncated (rare: empty answers)
    if empty:
        logger.warning("%d samples have no trainable token even before truncation", empty)
        sample_where = sample_where[: len(samples)]  # positions of the longest records may shift by those
    lengths = [len(s["input_ids"]) for s in samples]
    prompt_lens, answer_lens, turn_prompt, turn_answer, no_trainable = label_stats([s["labels"] for s in samples], cutoff_len)
    first = tally.samples
    tally.samples += len(samples) + empty
    tally.no_trainable += no_trainable + empty
    tally.lengths.update(lengths)
    tally.tokens["prompt"].update(prompt_lens)
    tally.tokens["answer"].update(answer_lens)
    if kind == "chat":
        tally.tokens["user_turn"].update(turn_prompt)
        tally.tokens["assistant_turn"].update(turn_answer)
    for i, n in enumerate(lengths):
        if i < len(sample_where):
            entry = (n, -(first + i), sample_where[i])
            if len(tally.longest) < LONGEST_SHOWN:
                heapq.heappush(tally.longest, entry)
            elif entry[:2] > tally.longest[0][:2]:
                heapq.heapreplace(tally.longest, entry)
    tally.valid += len(items)
    tally.languages.update(languages_of([_text_of(kind, item) for item in items]))
    repeats = _repeats(kind, items, tally.seen)
    tally.duplicates += sum(repeats)
    if window is not None:
        tally.near += sum(window.flags([rouge_tokens(_prompt_key(kind, item)) for item in items], skip=repeats))


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


def plot_lengths(lengths: Counter[int], cutoff_len: int, path: str | os.PathLike) -> None:
    """Histogram of whole-sample token lengths ({length: samples}) with the cutoff as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    values = sorted(lengths)
    ax.hist(values, weights=[lengths[v] for v in values], bins=min(60, max(10, len(values))), color="tab:blue", alpha=0.8)
    ax.axvline(cutoff_len, color="tab:red", linestyle="--", label=f"cutoff_len {cutoff_len}")
    over = sum(c for n, c in lengths.items() if n > cutoff_len)
    ax.set_title(f"{sum(lengths.values())} samples, {over} longer than the cutoff")
    ax.set_xlabel("tokens per sample (BOS and EOS included)")
    ax.set_ylabel("samples")
    ax.legend()
    save_figure(fig, path)


def write_report(report: dict[str, Any], lengths: Counter[int], output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    atomic_write_text(out / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(report))
    plot_lengths(lengths, report["cutoff_len"], out / "length_histogram.png")
    return out

"""Convert between the data formats people have: alpaca / BELLE / Guanaco / Chinese-Vicuna /
ShareGPT / OpenAI messages / role-text in, alpaca, ShareGPT or OpenAI-messages JSONL out.

Every record is read into one of two shapes: an alpaca record (single turn, with its `input`
kept apart) or a list of `{"role", "content"}` messages (data/formats.py validates
them). Writers turn either shape into the target format; a record the target cannot hold
(a multi-turn conversation as alpaca) or a broken one is dropped and counted with the reason.

Input formats, detected per record:

- alpaca (Stanford Alpaca, BELLE 0.5M/1M/2M, Guanaco's instruction data, Chinese-Vicuna's
  merge.json): `{"instruction", "input"?, "output"}`
- BELLE multi-turn (multiturn_chat_0.8M, school_math): the same keys, with the dialogue in
  `instruction` as `Human: ...\\nAssistant: ...\\nHuman: ...\\nAssistant:` and the last answer in `output`
- Guanaco chat (openassistant-guanaco): `{"text": "### Human: ... ### Assistant: ..."}`
- Chinese-Vicuna chat, ShareGPT (BELLE 3.5M's `conversations` too), OpenAI messages, role-text:
  as data/formats.py reads them
"""

from __future__ import annotations

import json
import logging
import os
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chinese_vicuna.data.chat import plan_chunks, round_lengths, split_system, template_trains_eos
from chinese_vicuna.data.fast_tokenize import encode_texts
from chinese_vicuna.data.formats import check_messages, detect_format, to_messages
from chinese_vicuna.data.records import Record, iter_records
from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)

TARGETS = ("alpaca", "sharegpt", "openai")
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}

@dataclass
class ConvertStats:
    """What happened to the records: converted, split, dropped (with the reason)."""

    records: int = 0
    converted: int = 0
    written: int = 0
    split: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "converted": self.converted,
            "written": self.written,
            "split": self.split,
            "formats": dict(self.formats),
            "dropped": dict(self.dropped),
            "notes": dict(self.notes),
        }


# --------------------------------------------------------------------------------------------
# Reading any format into alpaca records or messages
# --------------------------------------------------------------------------------------------
def record_format(data: Any) -> str | None:
    """The input format of one record, or None: a registered format (data/formats.py, the
    conversion-only ones included), else alpaca (the single-turn shape kept as it is)."""
    fmt = detect_format(data, conversion=True)
    if fmt is None and isinstance(data, dict) and "output" in data and isinstance(data.get("instruction"), str):
        return "alpaca"
    return fmt


def read_record(record: Record) -> tuple[str, dict[str, str] | list[dict[str, Any]]]:
    """(format, an alpaca dict or a list of messages). Raises UserError for broken records."""
    data = record.data
    fmt = record_format(data)
    if fmt is None:
        raise UserError(f"{record.where}: not a record in a known format")
    if fmt == "alpaca":
        for key in ("instruction", "input", "output"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise UserError(f"{record.where}: field {key!r} is not a string")
        if not data["instruction"].strip():
            raise UserError(f"{record.where}: field 'instruction' is empty")
        if not data["output"].strip():
            raise UserError(f"{record.where}: field 'output' is empty")
        return fmt, {"instruction": data["instruction"], "input": data.get("input") or "", "output": data["output"]}
    messages, _ = check_messages(to_messages(record, fmt), record.where)
    return fmt, messages


def alpaca_to_messages(rec: dict[str, str]) -> list[dict[str, str]]:
    """One user turn (instruction, then the input on the next line) and the answer."""
    user = rec["instruction"] + ("\n" + rec["input"] if rec["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


# --------------------------------------------------------------------------------------------
# HTML → markdown (ShareGPT)
# --------------------------------------------------------------------------------------------
_HTML_HINT = re.compile(r"<(p|div|pre|code|ol|ul|li|br|strong|em|b|i|h[1-6]|table|span|a|blockquote)\b[^>]*>", re.IGNORECASE)


def looks_like_html(text: str) -> bool:
    return bool(_HTML_HINT.search(text))


def html_to_markdown(html: str) -> str:
    """ShareGPT's HTML (from the ChatGPT page) as markdown: paragraphs, lists, fenced code blocks
    with their language, inline code, bold, line breaks and entities, via `markdownify`.

    The ChatGPT page puts a header ("python" + "Copy code") inside every <pre>; it is removed and
    its language goes on the fence.
    """
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(html, "html.parser")
    for pre in soup.find_all("pre"):
        code = pre.find("code")
        if code is None:
            continue
        language = next((c[len("language-") :] for c in code.get("class", []) if c.startswith("language-")), "")
        if not language:  # the header text, as in <div>python</div><div>Copy code</div>
            header = pre.get_text("\n").split("\n", 1)[0].strip() if pre.find("div") else ""
            language = header if re.fullmatch(r"[A-Za-z0-9+#._-]{1,20}", header or "") and header.lower() != "copy" else ""
        text = code.get_text()
        pre.clear()
        new_code = soup.new_tag("code")
        new_code.string = text
        pre.append(new_code)
        pre["data-language"] = language

    converter = MarkdownConverter(
        heading_style="ATX",
        bullets="-",
        code_language_callback=lambda el: el.get("data-language") or None,
        escape_asterisks=False,
        escape_underscores=False,
        escape_misc=False,
    )
    markdown = converter.convert_soup(soup)
    markdown = re.sub(r"[ \t]+\n", "\n", markdown)  # markdownify's hard breaks ("  \n") as plain newlines
    markdown = re.sub(r"\n{3,}", "\n\n", markdown)
    return markdown.strip()


# --------------------------------------------------------------------------------------------
# Splitting long conversations
# --------------------------------------------------------------------------------------------
class Splitter:
    """Splits conversations at turn boundaries so each part fits `max_tokens` when rendered with
    `template` and tokenized as finetune_chat.py does (BOS and the trained EOS included): the
    same plan finetune_chat.py makes, done ahead of time so every part is a record of its own."""

    def __init__(self, tokenizer: Any, template: Any, max_tokens: int) -> None:
        if not template.is_chat:
            raise UserError(f"--prompt_template {template.name}: splitting needs a chat template")
        self.tokenizer = tokenizer
        self.template = template
        self.budget = max_tokens - 1 - int(not template_trains_eos(template, tokenizer))

    def _round_lengths(self, messages: list[dict[str, str]]) -> list[int]:
        segs = self.template.chat_segments(messages, add_generation_prompt=False)
        return round_lengths(segs, [len(x) for x in encode_texts(self.tokenizer, [s.text for s in segs])])

    def split(self, messages: list[dict[str, str]]) -> tuple[list[list[dict[str, str]]], int]:
        """(the parts, how many parts still exceed the budget on their own)."""
        mid = self._round_lengths(messages)
        if sum(mid) <= self.budget:
            return [messages], 0
        head, rounds = split_system(messages)
        first = [mid[0]] + [sum(self._round_lengths(head + r)) for r in rounds[1:]]
        chunks = plan_chunks(first, mid, self.budget)
        parts = [head + [m for r in rounds[a:b] for m in r] for a, b in chunks]
        too_long = sum(1 for a, b in chunks if b - a == 1 and first[a] > self.budget)
        return parts, too_long


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def to_target(item: dict[str, str] | list[dict[str, Any]], target: str) -> dict[str, Any]:
    """An alpaca dict or a message list as one record of `target` (alpaca needs one turn)."""
    if target == "alpaca":
        if isinstance(item, dict):
            return item
        turns = [m for m in item if m["role"] != "system"]
        if len(turns) != 2:
            raise UserError("a multi-turn conversation has no alpaca form (use --to sharegpt or --to openai)")
        if len(turns) != len(item):
            raise UserError("a system prompt has no alpaca form (use --to sharegpt or --to openai)")
        return {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
    messages = alpaca_to_messages(item) if isinstance(item, dict) else item
    if target == "openai":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


def _reason(exc: UserError) -> str:
    """A countable reason: the message without its 'file:line: ' prefix and message numbers."""
    text = str(exc)
    text = text.split(": ", 1)[1] if re.match(r"^\S.*?(:\d+| record \d+): ", text) else text
    return re.sub(r"message \d+", "a message", text)


def convert_records(
    records: Iterable[Record],
    target: str,
    html: bool = False,
    splitter: Splitter | None = None,
    stats: ConvertStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Converted records, lazily; `stats` counts what was converted, split and dropped, and why."""
    if target not in TARGETS:
        raise UserError(f"--to {target}: use one of {', '.join(TARGETS)}")
    stats = stats if stats is not None else ConvertStats()
    for record in records:
        stats.records += 1
        try:
            fmt, item = read_record(record)
        except UserError as exc:
            stats.dropped[_reason(exc)] += 1
            continue
        stats.formats[fmt] += 1
        if isinstance(item, list) and html:
            for m in item:
                if looks_like_html(m["content"]):
                    m["content"] = html_to_markdown(m["content"])
                    stats.notes["messages converted from HTML"] += 1
            try:
                item, _ = check_messages(item, record.where)  # a message may be empty once its HTML is gone
            except UserError as exc:
                stats.dropped[_reason(exc)] += 1
                continue
        parts: list[Any] = [item]
        if splitter is not None:
            messages = alpaca_to_messages(item) if isinstance(item, dict) else item
            split, too_long = splitter.split(messages)
            if len(split) > 1:
                stats.split += 1
                parts = split
            if too_long:
                stats.notes["rounds longer than --split_to_tokens on their own (training truncates them)"] += too_long
        try:
            converted = [to_target(p, target) for p in parts]
        except UserError as exc:
            stats.dropped[str(exc)] += 1
            continue
        stats.converted += 1
        for c in converted:
            stats.written += 1
            yield c


def convert_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    target: str,
    html: bool = False,
    splitter: Splitter | None = None,
) -> ConvertStats:
    """Convert one .json/.jsonl file: JSON lines, or a JSON list when `output_path` ends in .json
    (the training scripts read either by its suffix). Streamed: one record in memory at a time
    (a .json list is read incrementally); written atomically."""
    from chinese_vicuna.files import atomic_writer

    stats = ConvertStats()
    as_list = Path(output_path).suffix == ".json"
    with atomic_writer(output_path) as f:
        for n, record in enumerate(convert_records(iter_records(input_path), target, html, splitter, stats)):
            if as_list:  # the bytes json.dumps(records, indent=1) writes, one record at a time
                f.write(((",\n" if n else "[\n") + textwrap.indent(json.dumps(record, ensure_ascii=False, indent=1), " ")).encode("utf-8"))
            else:
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        if not stats.written:
            raise UserError(f"{input_path}: no record could be converted ({json.dumps(stats.dropped, ensure_ascii=False)})")
        if as_list:
            f.write(b"\n]\n")
    return stats

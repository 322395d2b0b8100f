"""Prompts for RL with verifiable rewards (finetune_grpo.py): records → prompt ids + reward columns.

Formats (detected per record):
- `trl`: `{"prompt": "..."}` or `{"prompt": [{"role", "content"}, ...]}` (TRL's GRPO data);
- `sharegpt` / `messages`: `{"conversations": [...]}` or `{"messages": [...]}`, a last assistant
  turn dropped (the answer the policy writes itself), `system` added in front where given;
- `alpaca`: `{"instruction", "input"}` (+ `system`, `history` as in LLaMA-Factory's files).

Every other field of the record (`answer`, `solution`, an alpaca `output`...) is kept as a
column for the reward functions (train/rewards.py), which get them as keyword lists.

The prompt ids come from the inference owner (`Engine`'s `instruction_ids` / `prompt_ids`), so
the policy is asked exactly as generate.py and chat.py ask it. Prompts longer than
`max_prompt_length` tokens are dropped and counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chinese_vicuna.data.preference import _alpaca_prompt, _messages, _prompt_of, _with_system
from chinese_vicuna.data.records import Record, data_files, iter_records
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import validate_messages

logger = logging.getLogger(__name__)

# The fields that make the prompt in each format (the rest are reward columns).
PROMPT_FIELDS = {
    "trl": ("prompt",),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages", "system"),
    "alpaca": ("instruction", "input", "system", "history"),
}


@dataclass
class RlPrompt:
    """One record: how the reward functions see its prompt (a string, or messages for a
    conversational record, as TRL passes it), the messages the template renders, the alpaca
    (instruction, input) where it is one instruction, and its other fields."""

    prompt: str | list[dict[str, str]]
    messages: list[dict[str, str]]
    instruction: tuple[str, str] | None
    columns: dict[str, Any]
    where: str


def record_format(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    return next((name for name, fields in PROMPT_FIELDS.items() if fields[0] in data), None)


def to_prompt(record: Record) -> RlPrompt:
    """The record's prompt and reward columns; a record without a prompt is one line naming it."""
    fmt = record_format(record.data)
    if fmt is None:
        raise UserError(
            f"{record.where}: no prompt: give 'prompt' (text or messages), 'conversations' / 'messages', or 'instruction' (+ 'input')"
        )
    columns = {k: v for k, v in record.data.items() if k not in PROMPT_FIELDS[fmt]}
    if fmt == "trl":
        messages, instruction = _prompt_of(record)
        shown: str | list[dict[str, str]] = record.data["prompt"] if isinstance(record.data["prompt"], str) else messages
    elif fmt == "alpaca":
        messages, instruction = _alpaca_prompt(record)
        shown = messages[-1]["content"]
    else:
        key = PROMPT_FIELDS[fmt][0]
        messages = _messages(record, record.data[key], repr(key))
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the answer of an SFT record: the policy writes its own
        if not messages:
            raise UserError(f"{record.where}: {key!r} has no user turn before its answer")
        messages = _with_system(record, messages)
        single = len(messages) == 1 and messages[0]["role"] == "user"
        instruction, shown = ((messages[0]["content"], "") if single else None), messages
    try:
        validate_messages([*messages, {"role": "assistant", "content": "x"}], record.where)
    except UserError as exc:
        raise UserError(f"{exc} (the prompt must alternate user and assistant turns and end with the user's)") from None
    return RlPrompt(shown, messages, instruction, columns, record.where)


class PromptDataset:
    """Prompt samples for the GRPO trainer: `prompt_ids` (the template applied, BOS first), the
    prompt as the reward functions see it, the record's columns; `lengths`: prompt tokens."""

    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.samples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(s["prompt_ids"]) for s in self.samples]


def read_prompts(files: Iterable[str | os.PathLike]) -> list[RlPrompt]:
    return [to_prompt(r) for path in files for r in iter_records(path)]


def load_prompt_dataset(data_path: str, engine: Any, max_prompt_length: int) -> PromptDataset:
    """Prompts of `data_path` (a file, a folder of them, comma-separated paths) as ids the engine
    builds (`Engine.instruction_ids` for an instruction template, `Engine.prompt_ids` for a chat
    one); prompts over `max_prompt_length` tokens are dropped and counted."""
    files = [f for part in data_path.split(",") if part.strip() for f in data_files(part.strip())]
    prompts = read_prompts(files)
    template = engine.template
    samples, too_long = [], 0
    for p in prompts:
        if template.is_chat:
            ids = engine.prompt_ids(p.messages)
        elif p.instruction is None:
            raise UserError(
                f"{p.where}: a prompt with a system message or earlier turns needs a chat --prompt_template "
                f"(e.g. chinese-vicuna-chat, chatml); {template.name} is an instruction template"
            )
        else:
            ids = engine.instruction_ids(*p.instruction)
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        samples.append({"prompt_ids": list(ids), "prompt": p.prompt, "columns": p.columns, "where": p.where})
    logger.info("%d records → %d prompts; %d dropped: prompt longer than --max_prompt_length %d", len(prompts), len(samples), too_long, max_prompt_length)  # fmt: skip
    if not samples:
        raise UserError(f"--data_path {data_path}: no prompt left (of {len(prompts)} records); check the file and --max_prompt_length")
    return PromptDataset(samples)


def column_lists(samples: Sequence[dict[str, Any]], repeat: int) -> dict[str, list[Any]]:
    """The records' columns as keyword lists, each record's values repeated `repeat` times (one per
    completion of its group), as TRL passes them; a column a record lacks is None there."""
    names = list(dict.fromkeys(k for s in samples for k in s["columns"]))
    return {name: [s["columns"].get(name) for s in samples for _ in range(repeat)] for name in names}

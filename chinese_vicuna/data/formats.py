"""The registry of chat data formats (detected per file from its first record; one format per file):

- `chinese-vicuna`: `{"input": [u1, ..., un], "output": [a1, ..., an]}`
- `sharegpt`: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`
- `openai`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- `role-text`: a bare list `[{"role": ..., "text": str}, ...]` (the 65B QLoRA projects' form)

and two that tools/convert_data.py reads (per record) and training does not (convert them first):

- `belle-multiturn` (BELLE multiturn_chat_0.8M, school_math): `{"instruction": "Human: ...\nAssistant: ...", "output"}`
- `guanaco` (openassistant-guanaco): `{"text": "### Human: ... ### Assistant: ..."}`

Each format is one `register_format(ChatFormat(...))` entry below, the one registry of data
formats that become messages: a new format lands there alone.
Every record becomes a list of `{"role", "content"}` messages: an optional system message,
then user/assistant turns alternating. A final user turn with no answer is dropped (and
counted); any other problem ends in a UserError naming the file, the record and the message.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chinese_vicuna.data.encode import TokenizeStats
from chinese_vicuna.data.records import Record, read_records
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import validate_messages

logger = logging.getLogger(__name__)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    """Validated messages of one record and where the record came from."""

    messages: list[dict[str, str]]
    where: str


@dataclass(frozen=True)
class ChatFormat:
    """One data format: how to recognise a record of it, and its messages as `{"role", "content"}`."""

    name: str
    description: str
    detect: Callable[[Any], bool]
    to_messages: Callable[[Record], list[dict[str, Any]]]
    trainable: bool = True  # False: read by tools/convert_data.py only (training reads the converted file)


FORMATS: dict[str, ChatFormat] = {}


def register_format(fmt: ChatFormat) -> ChatFormat:
    """Add a format; detection tries formats in registration order."""
    FORMATS[fmt.name] = fmt
    return fmt


def _message_list(record: Record, key: str | None) -> list[Any]:
    value = record.data if key is None else record.data[key]
    if not isinstance(value, list):
        raise UserError(f"{record.where}: {key!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise UserError(f"{record.where}: {key or 'the conversation'!r} is an empty list")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise UserError(f"{record.where}: message {i + 1} must be a JSON object, got {type(msg).__name__}")
    return value


def _role_messages(record: Record, key: str | None, role_key: str, text_key: str, fmt: str, roles: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Messages stored as a list of objects with a role field and a text field."""
    messages = []
    for i, msg in enumerate(_message_list(record, key)):
        if role_key not in msg or text_key not in msg:
            raise UserError(f"{record.where}: message {i + 1} needs {role_key!r} and {text_key!r} ({FORMATS[fmt].description})")
        role = msg[role_key]
        if roles is not None:
            role = roles.get(role) if isinstance(role, str) else None
            if role is None:
                raise UserError(f"{record.where}: message {i + 1} has unknown {role_key!r} value {msg[role_key]!r}; use human, gpt or system")
        messages.append({"role": role, "content": msg[text_key]})
    return messages


def _pairs_to_messages(record: Record) -> list[dict[str, Any]]:
    data = record.data
    inputs, outputs = data["input"], data["output"]
    for key, value in (("input", inputs), ("output", outputs)):
        if not isinstance(value, list):
            raise UserError(f"{record.where}: {key!r} must be a list of turns (strings), got {type(value).__name__}")
    if len(outputs) not in (len(inputs), len(inputs) - 1):
        raise UserError(
            f"{record.where}: 'input' has {len(inputs)} user turns but 'output' has {len(outputs)} answers; "
            "each user turn needs its answer (the last one may be left unanswered)"
        )
    messages: list[dict[str, Any]] = []
    for i, user in enumerate(inputs):
        messages.append({"role": "user", "content": user})
        if i < len(outputs):
            messages.append({"role": "assistant", "content": outputs[i]})
    return messages


register_format(ChatFormat(
    "sharegpt", 'ShareGPT ({"conversations": [{"from", "value"}]})',
    lambda data: isinstance(data, dict) and "conversations" in data,
    lambda record: _role_messages(record, "conversations", "from", "value", "sharegpt", SHAREGPT_ROLES),
))  # fmt: skip
register_format(ChatFormat(
    "openai", 'OpenAI messages ({"messages": [{"role", "content"}]})',
    lambda data: isinstance(data, dict) and "messages" in data,
    lambda record: _role_messages(record, "messages", "role", "content", "openai"),
))  # fmt: skip
register_format(ChatFormat(
    "chinese-vicuna", 'Chinese-Vicuna chat ({"input": [...], "output": [...]})',
    lambda data: isinstance(data, dict) and "input" in data and "output" in data and (isinstance(data["input"], list) or isinstance(data["output"], list)),
    _pairs_to_messages,
))  # fmt: skip
register_format(ChatFormat(
    "role-text", 'a bare list of {"role", "text"}',
    lambda data: isinstance(data, list) and bool(data) and all(isinstance(m, dict) and "role" in m for m in data),
    lambda record: _role_messages(record, None, "role", "text", "role-text"),
))  # fmt: skip


_BELLE_TURN = re.compile(r"(?:^|\n)\s*(Human|Assistant)\s*[:：]", re.IGNORECASE)
_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def _dialogue_turns(text: str, pattern: re.Pattern[str]) -> list[tuple[str, str]] | None:
    """[(role, text)] from "Human: ... Assistant: ..." text, or None when it is not such text."""
    marks = list(pattern.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        return None
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "user" if m.group(1).lower() == "human" else "assistant"
        turns.append((role, text[m.end() : end].strip()))
    return turns


def _belle_messages(record: Record) -> list[dict[str, Any]]:
    data = record.data
    turns = _dialogue_turns(data["instruction"], _BELLE_TURN) or []
    if turns and turns[-1] == ("assistant", ""):
        turns = turns[:-1]  # the open "Assistant:" whose answer is `output`
    if not isinstance(data["output"], str):
        raise UserError(f"{record.where}: field 'output' is not a string")
    return [{"role": r, "content": t} for r, t in turns] + [{"role": "assistant", "content": data["output"].strip()}]


def _guanaco_messages(record: Record) -> list[dict[str, Any]]:
    turns = _dialogue_turns(record.data["text"].strip(), _GUANACO_TURN)
    if turns is None:
        raise UserError(f"{record.where}: text before the first '### Human:'")
    return [{"role": r, "content": t} for r, t in turns]


register_format(ChatFormat(
    "guanaco", 'Guanaco chat ({"text": "### Human: ... ### Assistant: ..."})',
    lambda data: isinstance(data, dict) and isinstance(data.get("text"), str) and bool(_GUANACO_TURN.search(data["text"])),
    _guanaco_messages, trainable=False,
))  # fmt: skip
register_format(ChatFormat(
    "belle-multiturn", 'BELLE multi-turn ({"instruction": "Human: ...\\nAssistant: ...", "output"})',
    lambda data: isinstance(data, dict) and "output" in data and isinstance(data.get("instruction"), str)
    and _dialogue_turns(data["instruction"], _BELLE_TURN) is not None,
    _belle_messages, trainable=False,
))  # fmt: skip


def detect_format(data: Any, conversion: bool = False) -> str | None:
    """The name of the format a record looks like (by its keys), or None. `conversion`: also the
    formats only tools/convert_data.py reads."""
    return next((fmt.name for fmt in FORMATS.values() if (fmt.trainable or conversion) and fmt.detect(data)), None)


def to_messages(record: Record, fmt: str) -> list[dict[str, Any]]:
    """The record's messages as `{"role", "content"}` (content not yet checked)."""
    return FORMATS[fmt].to_messages(record)


def _unknown_format(record: Record) -> UserError:
    data = record.data
    hint = ""
    if isinstance(data, dict) and "role" in data:
        hint = " (one message, not a conversation: in a .json file each record must be a whole conversation, a list of messages)"
    elif isinstance(data, dict) and isinstance(data.get("input"), str):
        hint = " ('input' is a string: alpaca instruction data goes to finetune.py; chat data has lists of turns)"
    formats = "; ".join(fmt.description for fmt in FORMATS.values() if fmt.trainable)
    return UserError(f"{record.where}: not a conversation in a known format{hint}; use one of: {formats}")


def check_messages(messages: list[dict[str, Any]], where: str) -> tuple[list[dict[str, str]], bool]:
    """Validate contents and role order; drop a final unanswered user turn.

    Returns (messages, whether a final user turn was dropped).
    """
    validate_messages(messages, where)  # roles, string contents, turn order
    for i, msg in enumerate(messages):
        if not msg["content"].strip():
            raise UserError(f"{where}: message {i + 1} ({msg['role']}) is empty; remove the turn or the record")
    dropped = messages[-1]["role"] == "user"
    if dropped:
        messages = messages[:-1]
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn to train on")
    return messages, dropped


def read_conversations(path: str | os.PathLike, stats: TokenizeStats | None = None) -> list[Conversation]:
    """Validated conversations of one data file (one format per file)."""
    records = read_records(path)
    fmt = detect_format(records[0].data)
    if fmt is None:
        raise _unknown_format(records[0])
    conversations = []
    dropped = 0
    for record in records:
        this = detect_format(record.data)
        if this is None:
            raise _unknown_format(record)
        if this != fmt:
            raise UserError(
                f"{record.where}: record in {FORMATS[this].description} format, but the file started in {FORMATS[fmt].description} format "
                f"({records[0].where}); use one format per file"
            )
        messages, was_dropped = check_messages(to_messages(record, fmt), record.where)
        dropped += was_dropped
        conversations.append(Conversation(messages, record.where))
    logger.info("%s: %d conversations in %s format", path, len(conversations), fmt)
    if stats is not None and dropped:
        key = "unanswered final user turns dropped"
        stats.extra[key] = stats.extra.get(key, 0) + dropped
    return conversations

"""Multi-turn chat data: read four formats, validate, split long conversations, tokenize.

Formats (detected per file from its first record; every record must then be in that format):

- `chinese-vicuna`: `{"input": [u1, ..., un], "output": [a1, ..., an]}`
- `sharegpt`: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`
- `openai`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- `role-text`: a bare list `[{"role": ..., "text": str}, ...]` (the 65B QLoRA projects' form)

Every record becomes a list of `{"role", "content"}` messages: an optional system message,
then user/assistant turns alternating. A final user turn with no answer is dropped (and
counted); any other problem ends in a UserError naming the file, the record and the message.

Labels (docs/finetune_chat.md): every assistant turn and its end marker is trained, user and
system text is -100. The end of a sample is learned too: when the template's assistant turn
does not already end with the tokenizer's EOS (chinese-vicuna-chat: `{content}\\n\\n`; chatml;
llama3), a trained EOS follows the last assistant turn of every sample, so generation ends
with EOS, and the template's stop strings catch the rest at inference.
`train_on_last_turn_only` (Chinese-Vicuna's own behaviour) masks all but the last assistant
turn, keeping the ids identical (segments are never re-merged).

Conversations longer than `cutoff_len` tokens are split at turn boundaries into several
samples, each starting at a user turn and repeating the system prompt; one round longer than
the cutoff on its own is truncated (and counted).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chinese_vicuna.data import (
    Record,
    TokenizeStats,
    build_or_load,
    data_files,
    encode_texts,
    read_records,
    tokenize_segment_lists,
)
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import PromptTemplate, Segment, validate_messages

logger = logging.getLogger(__name__)

# Bump when the chat samples' form changes (the tokenized-data cache key includes it).
CHAT_DATA_VERSION = "1"

FORMAT_NAMES = {
    "chinese-vicuna": 'Chinese-Vicuna chat ({"input": [...], "output": [...]})',
    "sharegpt": 'ShareGPT ({"conversations": [{"from", "value"}]})',
    "openai": 'OpenAI messages ({"messages": [{"role", "content"}]})',
    "role-text": 'a bare list of {"role", "text"}',
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    """Validated messages of one record and where the record came from."""

    messages: list[dict[str, str]]
    where: str


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------
def detect_format(data: Any) -> str | None:
    """The format a record looks like (by its keys), or None."""
    if isinstance(data, dict):
        if "conversations" in data:
            return "sharegpt"
        if "messages" in data:
            return "openai"
        if "input" in data and "output" in data and (isinstance(data["input"], list) or isinstance(data["output"], list)):
            return "chinese-vicuna"
    if isinstance(data, list) and data and all(isinstance(m, dict) and "role" in m for m in data):
        return "role-text"
    return None


def _unknown_format(record: Record) -> UserError:
    data = record.data
    hint = ""
    if isinstance(data, dict) and "role" in data:
        hint = " (one message, not a conversation: in a .json file each record must be a whole conversation, a list of messages)"
    elif isinstance(data, dict) and isinstance(data.get("input"), str):
        hint = " ('input' is a string: alpaca instruction data goes to finetune.py; chat data has lists of turns)"
    formats = "; ".join(FORMAT_NAMES.values())
    return UserError(f"{record.where}: not a conversation in a known format{hint}; use one of: {formats}")


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


def to_messages(record: Record, fmt: str) -> list[dict[str, Any]]:
    """The record's messages as `{"role", "content"}` (content not yet checked)."""
    if fmt == "chinese-vicuna":
        return _pairs_to_messages(record)
    if fmt == "sharegpt":
        messages = []
        for i, msg in enumerate(_message_list(record, "conversations")):
            if "from" not in msg or "value" not in msg:
                raise UserError(f"{record.where}: message {i + 1} needs 'from' and 'value' (ShareGPT format)")
            role = SHAREGPT_ROLES.get(msg["from"]) if isinstance(msg["from"], str) else None
            if role is None:
                raise UserError(f"{record.where}: message {i + 1} has unknown 'from' value {msg['from']!r}; use human, gpt or system")
            messages.append({"role": role, "content": msg["value"]})
        return messages
    key, text_key = ("messages", "content") if fmt == "openai" else (None, "text")
    messages = []
    for i, msg in enumerate(_message_list(record, key)):
        if "role" not in msg or text_key not in msg:
            raise UserError(f"{record.where}: message {i + 1} needs 'role' and {text_key!r} ({FORMAT_NAMES[fmt]})")
        messages.append({"role": msg["role"], "content": msg[text_key]})
    return messages


def check_messages(messages: list[dict[str, Any]], where: str) -> tuple[list[dict[str, str]], bool]:
    """Validate contents and role order; drop a final unanswered user turn.

    Returns (messages, whether a final user turn was dropped).
    """
    for i, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if role not in ("system", "user", "assistant"):
            raise UserError(f"{where}: message {i + 1} has unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i + 1} ({role}) must be a string, got {type(content).__name__}")
        if not content.strip():
            raise UserError(f"{where}: message {i + 1} ({role}) is empty; remove the turn or the record")
    validate_messages(messages, where)
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
                f"{record.where}: record in {FORMAT_NAMES[this]} format, but the file started in {FORMAT_NAMES[fmt]} format "
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


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------
def template_trains_eos(template: PromptTemplate, tokenizer: Any) -> bool:
    """Whether the template's assistant turn already ends with the tokenizer's EOS."""
    eos = getattr(tokenizer, "eos_token", None)
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    last = template.chat_segments(probe, add_generation_prompt=False)[-1]
    return bool(eos) and last.trainable and last.text.rstrip().endswith(eos)


def _split_system(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[list[dict[str, str]]]]:
    """(the system message as a list of 0 or 1, the rounds [user, assistant])."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head) :]
    return head, [turns[i : i + 2] for i in range(0, len(turns), 2)]


def plan_chunks(first_lens: Sequence[int], mid_lens: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Greedy split of rounds into [start, end) chunks whose token count fits `budget`.

    `first_lens[i]`: tokens of round i when it opens a sample (with the system prompt);
    `mid_lens[i]`: tokens of round i after another round. A round that does not fit alone
    gets a chunk of its own (truncated later).
    """
    chunks = []
    start = 0
    while start < len(first_lens):
        total, end = first_lens[start], start + 1
        while end < len(first_lens) and total + mid_lens[end] <= budget:
            total += mid_lens[end]
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def _lengths(tokenizer: Any, segment_lists: Sequence[Sequence[Segment]], batch_size: int = 1000) -> list[list[int]]:
    """Token counts of every segment, encoded in batches (only the counts are kept)."""
    out: list[list[int]] = []
    for start in range(0, len(segment_lists), batch_size):
        batch = segment_lists[start : start + batch_size]
        ids = encode_texts(tokenizer, [s.text for segs in batch for s in segs])
        pos = 0
        for segs in batch:
            out.append([len(x) for x in ids[pos : pos + len(segs)]])
            pos += len(segs)
    return out


def round_lengths(segments: Sequence[Segment], lengths: Sequence[int]) -> list[int]:
    """Tokens per round of a rendered conversation (segments alternate prompt / answer)."""
    if len(segments) % 2 or any(s.trainable == (i % 2 == 0) for i, s in enumerate(segments)):
        raise UserError("the chat template does not render user and assistant turns as alternating segments; pick another template")
    return [lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2)]


def conversation_segment_lists(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    add_eos: bool,
    train_on_last_turn_only: bool = False,
    stats: TokenizeStats | None = None,
) -> list[list[Segment]]:
    """Rendered samples: one per conversation, or several where one exceeds `cutoff_len`."""
    stats = stats if stats is not None else TokenizeStats()
    rendered = [template.chat_segments(c.messages, add_generation_prompt=False) for c in conversations]
    budget = cutoff_len - 1 - int(add_eos)  # BOS and the trained EOS count too
    # A segment never has more tokens than UTF-8 bytes + 1 (a prefix space): only conversations
    # above that bound need counting (the final tokenization would still truncate and count).
    maybe_long = [i for i, segs in enumerate(rendered) if sum(len(s.text.encode("utf-8")) + 1 for s in segs) > budget]
    lengths = dict(zip(maybe_long, _lengths(tokenizer, [rendered[i] for i in maybe_long]), strict=True))
    samples: list[list[Segment]] = []
    split = split_samples = 0
    for i, (conv, segs) in enumerate(zip(conversations, rendered, strict=True)):
        mid = round_lengths(segs, lengths.get(i, [0] * len(segs)))
        if i not in lengths or sum(mid) <= budget or len(mid) == 1:
            samples.append(list(segs))
            continue
        head, rounds = _split_system(conv.messages)
        # Round i opening a sample renders differently (system prompt, first-turn format).
        openers = [template.chat_segments(head + r, add_generation_prompt=False) for r in rounds[1:]]
        first = [mid[0]] + [sum(x) for x in _lengths(tokenizer, openers)]
        chunks = plan_chunks(first, mid, budget)
        for start, end in chunks:
            msgs = head + [m for r in rounds[start:end] for m in r]
            samples.append(template.chat_segments(msgs, add_generation_prompt=False))
        if len(chunks) > 1:
            split += 1
            split_samples += len(chunks)
    if split:
        stats.extra["conversations split at turn boundaries"] = stats.extra.get("conversations split at turn boundaries", 0) + split
        stats.extra["samples from split conversations"] = stats.extra.get("samples from split conversations", 0) + split_samples
    if train_on_last_turn_only:
        # Mask earlier answers without merging segments: the ids stay those inference builds.
        last_only = []
        for segs in samples:
            last = max(i for i, s in enumerate(segs) if s.trainable)
            last_only.append([Segment(s.text, s.trainable and i == last) for i, s in enumerate(segs)])
        samples = last_only
    return samples


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    train_on_last_turn_only: bool = False,
    stats: TokenizeStats | None = None,
) -> list[dict[str, list[int]]]:
    """Conversations → samples `[bos] segments... [eos?]` with assistant-only labels."""
    if not template.is_chat:
        raise UserError(f"--prompt_template {template.name}: an instruction template; finetune_chat.py needs a chat template")
    if train_on_inputs and train_on_last_turn_only:
        raise UserError("--train_on_inputs and --train_on_last_turn_only contradict each other; pick one")
    stats = stats if stats is not None else TokenizeStats()
    add_eos = not template_trains_eos(template, tokenizer)
    segment_lists = conversation_segment_lists(conversations, tokenizer, template, cutoff_len, add_eos, train_on_last_turn_only, stats)
    before = stats.total
    samples = tokenize_segment_lists(tokenizer, segment_lists, cutoff_len, add_eos, train_on_inputs, stats)
    stats.total = before + len(conversations)  # records, not the samples they became
    return samples


def load_chat_dataset(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    train_on_last_turn_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> list[dict[str, list[int]]]:
    """Read, validate, split and tokenize (or load from the cache) chat data files."""
    files = data_files(data_path)

    def build() -> list[dict[str, list[int]]]:
        stats = TokenizeStats()
        conversations = [c for path in files for c in read_conversations(path, stats)]
        samples = tokenize_conversations(conversations, tokenizer, template, cutoff_len, train_on_inputs, train_on_last_turn_only, stats)
        stats.log(str(data_path))
        return samples

    settings = {
        "kind": "chat",
        "version": CHAT_DATA_VERSION,
        "template": template.name,
        "spec": template.spec,
        "chat_template": getattr(tokenizer, "chat_template", None) if template.is_auto else None,
        "cutoff_len": cutoff_len,
        "train_on_inputs": train_on_inputs,
        "train_on_last_turn_only": train_on_last_turn_only,
    }
    samples = build_or_load(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)
    if not samples:
        raise UserError(f"{data_path}: no sample has a trainable token left after truncation; raise --cutoff_len")
    return samples

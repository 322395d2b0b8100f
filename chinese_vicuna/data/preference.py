"""Preference data: record formats → prompts with their answers, tokenized as groups of sequences.

Formats (detected per record, in registration order; `register_preference_format` adds one):

- `alpaca`: LLaMA-Factory's `{"instruction", "input", "chosen", "rejected"}` (+ `system`, `history`
  as `[[question, answer], ...]`);
- `sharegpt`: `{"conversations": [...], "chosen": {"from", "value"}, "rejected": {...}}` (+ `system`);
- `trl`: `{"prompt", "chosen", "rejected"}`, each a string or a list of `{"role", "content"}`;
- `trl-implicit`: `{"chosen": [...], "rejected": [...]}`, two whole conversations sharing a prefix
  (UltraFeedback-binarized): the shared messages are the prompt, the last assistant message each answer;
- `alpaca-kto`, `sharegpt-kto`: LLaMA-Factory's SFT records with a `kto_tag` (true: desirable);
- `trl-kto`: `{"prompt", "completion", "label"}`.

Tokenization (docs/design.md): the template renders the prompt once, identically before every
answer; each answer is encoded as a continuation of its prompt (data/encode.py), `[bos]` once, the
EOS (or the template's end of turn) after each answer, the prompt (and earlier turns) masked.
A pair whose sequences exceed `cutoff_len` loses prompt tokens from the start of the prompt
(BOS kept) so both answers stay whole and comparable; a pair whose answers alone do not fit is
dropped; both counted. Pairs whose answers encode identically are dropped and counted.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chinese_vicuna.data.cache import build_or_load
from chinese_vicuna.data.chat import template_trains_eos
from chinese_vicuna.data.datasets import load_tokenized, template_settings
from chinese_vicuna.data.encode import IGNORE_INDEX, TokenizeStats, tokenize_segment_lists
from chinese_vicuna.data.fast_tokenize import literal_specials
from chinese_vicuna.data.formats import SHAREGPT_ROLES
from chinese_vicuna.data.records import Record, data_files, iter_records
from chinese_vicuna.data.store import SequenceGroups, StoreWriter, TokenizedDataset
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import PromptTemplate, Segment, validate_messages

logger = logging.getLogger(__name__)

# Bump when the preference samples' form changes (the tokenized-data cache key includes it).
PREFERENCE_DATA_VERSION = "1"


@dataclass
class PreferenceExample:
    """One record: its prompt as messages (optional system, turns, ending with the user's) and its
    answers: [chosen, rejected] for a pair, [completion] for KTO with `desirable` set."""

    prompt: list[dict[str, str]]
    answers: list[str]
    where: str
    desirable: bool | None = None
    # (instruction, input) of an alpaca-style record: how an instruction template renders it
    instruction: tuple[str, str] | None = None


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    description: str
    detect: Callable[[Any], bool]
    convert: Callable[[Record], PreferenceExample]


PREFERENCE_FORMATS: dict[str, PreferenceFormat] = {}


def register_preference_format(fmt: PreferenceFormat) -> PreferenceFormat:
    """Add a format; detection tries formats in registration order."""
    PREFERENCE_FORMATS[fmt.name] = fmt
    return fmt


def _text(record: Record, key: str, required: bool = True) -> str:
    value = record.data.get(key, "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{record.where}: {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{record.where}: {key!r} is empty; give the text or remove the record")
    return value


def _messages(record: Record, value: Any, what: str) -> list[dict[str, str]]:
    """`{"role", "content"}` or ShareGPT `{"from", "value"}` objects → messages with our role names."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"{record.where}: {what} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise UserError(f"{record.where}: {what} message {i + 1} must be a JSON object, got {type(msg).__name__}")
        role, content = msg.get("role", msg.get("from")), msg.get("content", msg.get("value"))
        if role not in SHAREGPT_ROLES or not isinstance(content, str):
            raise UserError(
                f"{record.where}: {what} message {i + 1} needs a role (user/assistant/system, or human/gpt) and a string content"
            )
        out.append({"role": SHAREGPT_ROLES[role], "content": content})
    return out


def _answer(record: Record, key: str) -> str:
    """An answer given as a string, a message object, or a list of messages (the last one, the assistant's)."""
    value = record.data.get(key)
    if isinstance(value, str):
        text = value
    else:
        messages = _messages(record, value, repr(key))
        if messages[-1]["role"] != "assistant" or len(messages) > 1:
            raise UserError(f"{record.where}: {key!r} must be one assistant message (the prompt goes in 'prompt')")
        text = messages[-1]["content"]
    if not text.strip():
        raise UserError(f"{record.where}: {key!r} is empty; a pair needs two answers")
    return text


def _with_system(record: Record, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = _text(record, "system", required=False)
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def _alpaca_prompt(record: Record) -> tuple[list[dict[str, str]], tuple[str, str] | None]:
    instruction, input_ = _text(record, "instruction"), _text(record, "input", required=False)
    history = record.data.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
    ):
        raise UserError(f"{record.where}: 'history' must be a list of [question, answer] pairs of strings")
    turns = [{"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))]
    content = f"{instruction}\n{input_}" if input_ else instruction
    prompt = _with_system(record, [*turns, {"role": "user", "content": content}])
    return prompt, (instruction, input_) if len(prompt) == 1 else None


def _prompt_of(record: Record) -> tuple[list[dict[str, str]], tuple[str, str] | None]:
    value = record.data.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{record.where}: 'prompt' is empty")
        return [{"role": "user", "content": value}], (value, "")
    prompt = _messages(record, value, "'prompt'")
    return prompt, _single_instruction(prompt)


def _single_instruction(prompt: list[dict[str, str]]) -> tuple[str, str] | None:
    return (prompt[0]["content"], "") if len(prompt) == 1 and prompt[0]["role"] == "user" else None


def _alpaca(record: Record) -> PreferenceExample:
    prompt, instruction = _alpaca_prompt(record)
    return PreferenceExample(prompt, [_answer(record, "chosen"), _answer(record, "rejected")], record.where, None, instruction)


def _sharegpt_prompt(record: Record, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return _with_system(record, messages)


def _sharegpt(record: Record) -> PreferenceExample:
    prompt = _sharegpt_prompt(record, _messages(record, record.data["conversations"], "'conversations'"))
    return PreferenceExample(
        prompt, [_answer(record, "chosen"), _answer(record, "rejected")], record.where, None, _single_instruction(prompt)
    )


def _trl(record: Record) -> PreferenceExample:
    prompt, instruction = _prompt_of(record)
    return PreferenceExample(prompt, [_answer(record, "chosen"), _answer(record, "rejected")], record.where, None, instruction)


def _trl_implicit(record: Record) -> PreferenceExample:
    chosen = _messages(record, record.data["chosen"], "'chosen'")
    rejected = _messages(record, record.data["rejected"], "'rejected'")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    rest = (chosen[shared:], rejected[shared:])
    if shared == 0 or any(len(r) != 1 or r[0]["role"] != "assistant" for r in rest):
        raise UserError(
            f"{record.where}: 'chosen' and 'rejected' must be the same conversation up to one last assistant message each "
            f"(they share {shared} messages); or give the prompt in 'prompt'"
        )
    for name, r in zip(("chosen", "rejected"), rest, strict=True):
        if not r[0]["content"].strip():
            raise UserError(f"{record.where}: the {name} answer is empty; a pair needs two answers")
    prompt = chosen[:shared]
    return PreferenceExample(prompt, [rest[0][0]["content"], rest[1][0]["content"]], record.where, None, _single_instruction(prompt))


def _flag(record: Record, key: str) -> bool:
    value = record.data[key]
    if not isinstance(value, bool):
        raise UserError(f"{record.where}: {key!r} must be true or false, got {value!r}")
    return value


def _alpaca_kto(record: Record) -> PreferenceExample:
    prompt, instruction = _alpaca_prompt(record)
    return PreferenceExample(prompt, [_answer(record, "output")], record.where, _flag(record, "kto_tag"), instruction)


def _sharegpt_kto(record: Record) -> PreferenceExample:
    messages = _messages(record, record.data["conversations"], "'conversations'")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise UserError(f"{record.where}: 'conversations' must end with the assistant answer that 'kto_tag' judges")
    if not messages[-1]["content"].strip():
        raise UserError(f"{record.where}: the judged answer is empty")
    prompt = _sharegpt_prompt(record, messages[:-1])
    return PreferenceExample(prompt, [messages[-1]["content"]], record.where, _flag(record, "kto_tag"), _single_instruction(prompt))


def _trl_kto(record: Record) -> PreferenceExample:
    prompt, instruction = _prompt_of(record)
    return PreferenceExample(prompt, [_answer(record, "completion")], record.where, _flag(record, "label"), instruction)


def _has(*keys: str) -> Callable[[Any], bool]:
    return lambda data: isinstance(data, dict) and all(k in data for k in keys)


register_preference_format(PreferenceFormat("alpaca", "LLaMA-Factory alpaca {instruction, input, chosen, rejected}", _has("instruction", "chosen", "rejected"), _alpaca))  # fmt: skip
register_preference_format(PreferenceFormat("sharegpt", "ShareGPT {conversations, chosen, rejected}", _has("conversations", "chosen", "rejected"), _sharegpt))  # fmt: skip
register_preference_format(PreferenceFormat("trl", "TRL {prompt, chosen, rejected}", _has("prompt", "chosen", "rejected"), _trl))  # fmt: skip
register_preference_format(PreferenceFormat("trl-implicit", "TRL implicit prompt {chosen: [messages], rejected: [messages]}", _has("chosen", "rejected"), _trl_implicit))  # fmt: skip
register_preference_format(PreferenceFormat("alpaca-kto", "LLaMA-Factory KTO {instruction, input, output, kto_tag}", _has("instruction", "output", "kto_tag"), _alpaca_kto))  # fmt: skip
register_preference_format(PreferenceFormat("sharegpt-kto", "ShareGPT KTO {conversations, kto_tag}", _has("conversations", "kto_tag"), _sharegpt_kto))  # fmt: skip
register_preference_format(PreferenceFormat("trl-kto", "TRL KTO {prompt, completion, label}", _has("prompt", "completion", "label"), _trl_kto))  # fmt: skip


def to_example(record: Record) -> PreferenceExample:
    """The record as a prompt with its answers; a record of no known format, or a malformed one,
    is a UserError naming the file and the record."""
    fmt = next((f for f in PREFERENCE_FORMATS.values() if f.detect(record.data)), None)
    if fmt is None:
        formats = "; ".join(f.description for f in PREFERENCE_FORMATS.values())
        raise UserError(f"{record.where}: not a preference record in a known format; use one of: {formats}")
    example = fmt.convert(record)
    try:
        validate_messages([*example.prompt, {"role": "assistant", "content": "x"}], record.where)
    except UserError as exc:
        raise UserError(f"{exc} (the prompt must alternate user and assistant turns and end with the user's)") from None
    return example


def read_examples(files: Iterable[str | os.PathLike]) -> list[PreferenceExample]:
    return [to_example(r) for path in files for r in iter_records(path)]


def answer_segments(template: PromptTemplate, example: PreferenceExample, answer: str) -> list[Segment]:
    """The prompt rendered once by the template, then `answer` (the only trained segment)."""
    if not template.is_chat:
        if example.instruction is None:
            raise UserError(
                f"{example.where}: a prompt with a system message or earlier turns needs a chat --prompt_template "
                f"(e.g. chinese-vicuna-chat, chatml); {template.name} is an instruction template"
            )
        return template.instruction_segments(*example.instruction, answer)
    segments = template.chat_segments([*example.prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    last = max(i for i, s in enumerate(segments) if s.trainable)
    # earlier answers of the history are context, not trained; segments are not merged (same ids as inference)
    return [Segment(s.text, s.trainable and i == last) for i, s in enumerate(segments)]


def prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first trained one (BOS and the rendered prompt)."""
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def tokenize_examples(
    examples: Sequence[PreferenceExample], tokenizer: Any, template: PromptTemplate, cutoff_len: int, stats: TokenizeStats
) -> list[list[dict[str, list[int]]]]:
    """Every example as a group of sequences (its answers after the shared prompt), truncated
    prompt-first to `cutoff_len`; pairs that cannot fit or whose answers are the same are dropped (counted)."""
    protect = literal_specials(tokenizer).protect
    protected = [
        PreferenceExample(
            [{**m, "content": protect(m["content"])} for m in ex.prompt],
            ex.answers,
            ex.where,
            ex.desirable,
            None if ex.instruction is None else (protect(ex.instruction[0]), protect(ex.instruction[1])),
        )
        for ex in examples
    ]
    segment_lists = [answer_segments(template, ex, protect(answer)) for ex in protected for answer in ex.answers]
    add_eos = not template.is_chat or not template_trains_eos(template, tokenizer)
    encoded = tokenize_segment_lists(tokenizer, segment_lists, sys.maxsize, add_eos, False, TokenizeStats())
    if len(encoded) != len(segment_lists):  # every answer ends with a trained EOS or end of turn
        raise UserError("an answer encoded to no trained token; check the --prompt_template")
    bos = int(tokenizer.bos_token_id is not None)
    groups, pos = [], 0
    truncated = too_long = same = 0
    for ex in examples:
        group = encoded[pos : pos + len(ex.answers)]
        pos += len(ex.answers)
        prompt_len = prompt_length(group[0]["labels"])
        if any(
            s["input_ids"][:prompt_len] != group[0]["input_ids"][:prompt_len] or prompt_length(s["labels"]) != prompt_len for s in group
        ):
            raise UserError(f"{ex.where}: the template renders the prompt differently before each answer; pick a named --prompt_template")
        if len(group) == 2 and group[0]["input_ids"] == group[1]["input_ids"]:
            same += 1
            continue
        answer_len = max(len(s["input_ids"]) - prompt_len for s in group)
        if prompt_len + answer_len > cutoff_len:
            keep = cutoff_len - answer_len - bos  # prompt tokens left after BOS
            if keep < 1:
                too_long += 1
                continue
            truncated += 1
            cut = prompt_len - keep
            group = [{k: v[:bos] + v[cut:] for k, v in s.items()} for s in group]
        groups.append(group)
    stats.total += len(examples)
    stats.kept += len(groups)
    stats.truncated += truncated
    if too_long:
        stats.extra["dropped: answers alone longer than cutoff_len"] = too_long
    if same:
        stats.extra["dropped: chosen and rejected identical"] = same
    return groups


def _check_kind(examples: Sequence[PreferenceExample], kto: bool) -> None:
    for ex in examples:
        if kto and ex.desirable is None:
            raise UserError(f"{ex.where}: a chosen/rejected pair; --pref_loss kto trains on single answers with a kto_tag or label")
        if not kto and ex.desirable is not None:
            raise UserError(
                f"{ex.where}: a KTO record (one answer with kto_tag/label); pass --pref_loss kto, or give chosen/rejected pairs"
            )


def load_preference_dataset(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> SequenceGroups:
    """Chosen/rejected pairs of a file or folder (read, validated, tokenized, or loaded from the
    cache): `SequenceGroups(store, 2)`, chosen then rejected."""
    files = data_files(data_path)

    def build(writer: StoreWriter) -> None:
        examples = read_examples(files)
        _check_kind(examples, kto=False)
        stats = TokenizeStats()
        for group in tokenize_examples(examples, tokenizer, template, cutoff_len, stats):
            writer.add_samples(group)
        stats.log(str(data_path))

    settings = {
        "kind": "preference",
        "version": PREFERENCE_DATA_VERSION,
        **template_settings(template, tokenizer),
        "cutoff_len": cutoff_len,
    }
    return SequenceGroups(load_tokenized(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache), 2)


class KtoSamples:
    """KTO samples: the desirable and the undesirable answers (two stores, the flag in each one's
    cache settings), each sample `{"input_ids", "labels", "label"}` (label: desirable)."""

    def __init__(self, desirable: TokenizedDataset | None, undesirable: TokenizedDataset | None, index: np.ndarray | None = None) -> None:
        self.parts = (desirable, undesirable)
        sizes = [0 if p is None else len(p) for p in self.parts]
        self.index = np.arange(sum(sizes)) if index is None else np.asarray(index, dtype=np.int64)
        self.split = sizes[0]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.index[i])
        desirable = j < self.split
        sample = self.parts[0][j] if desirable else self.parts[1][j - self.split]  # type: ignore[index]
        return {**sample, "label": desirable}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths for p in self.parts if p is not None])[self.index]

    def select(self, indices: Sequence[int] | np.ndarray) -> KtoSamples:
        return KtoSamples(*self.parts, self.index[np.asarray(indices, dtype=np.int64)])


def load_kto_dataset(
    data_path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> KtoSamples:
    """KTO records (one answer each, judged desirable or not) of a file or folder."""
    files = data_files(data_path)
    parts = []
    for desirable in (True, False):

        def build(writer: StoreWriter, desirable: bool = desirable) -> None:
            examples = read_examples(files)
            _check_kind(examples, kto=True)
            stats = TokenizeStats()
            chosen = [ex for ex in examples if ex.desirable == desirable]
            for group in tokenize_examples(chosen, tokenizer, template, cutoff_len, stats):
                writer.add_samples(group)
            stats.log(f"{data_path} ({'desirable' if desirable else 'undesirable'})")

        settings = {
            "kind": "kto", "version": PREFERENCE_DATA_VERSION, "desirable": desirable,
            **template_settings(template, tokenizer), "cutoff_len": cutoff_len,
        }  # fmt: skip
        samples = build_or_load(str(data_path), files, tokenizer, settings, build, cache_dir, use_cache)
        parts.append(samples if len(samples) else None)  # none of this kind: the other kind may still train
    if all(p is None for p in parts):
        raise UserError(f"{data_path}: no KTO sample left; check the data file and --cutoff_len")
    return KtoSamples(*parts)


# ---------------------------------------------------------------- reference log-probabilities, stored with the pairs

REFERENCE_FOLDER = "reference-log-probs"  # inside a tokenized store's cache folder: removed with it


def stored_reference_log_probs(samples: Any, compute: Callable[[Any], np.ndarray], reference_key: str) -> np.ndarray:
    """Reference log-probabilities of every sequence of `samples` (an array: samples × sequences per
    sample, in the view's order), read from the tokenized store's cache folder where an earlier run
    of the same reference (`reference_key`: base, reference adapter, precision, template) stored
    them, else `compute(groups)`d for the whole store once and stored there. A view over stores
    (a train/validation split, a mixture) reads each store's array; anything else is computed."""
    if isinstance(samples, SequenceGroups) and samples.sequences.indices is None:
        whole = SequenceGroups(samples.sequences, samples.group_size)
        return _store_reference(whole, compute, reference_key)[samples.groups]
    pools = getattr(samples, "pools", None)  # data/mixing.py MixedDataset: global numbers over its pools
    if pools and all(isinstance(p, SequenceGroups) for p in pools):
        arrays = [stored_reference_log_probs(p, compute, reference_key) for p in pools]
        return np.concatenate(arrays)[samples.numbers]
    return compute(samples)


def _store_reference(groups: SequenceGroups, compute: Callable[[Any], np.ndarray], reference_key: str) -> np.ndarray:
    from chinese_vicuna.files import atomic_write_bytes

    path = Path(groups.sequences.folder) / REFERENCE_FOLDER / f"{reference_key}.npy"
    shape = (len(groups), groups.group_size)
    if path.is_file():
        try:
            stored = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("%s: unreadable (%s); computing the reference log-probabilities again", path, exc)
        else:
            if stored.shape == shape and stored.dtype == np.float32:
                logger.info("reference log-probabilities of %d samples loaded from %s", len(groups), path)
                return stored
            logger.warning("%s: shape %s, expected %s; computing the reference log-probabilities again", path, stored.shape, shape)
    values = np.ascontiguousarray(compute(groups), dtype=np.float32).reshape(shape)
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        logger.info("reference log-probabilities of %d samples computed and stored in %s", len(groups), path)
    except OSError as exc:  # a read-only shared cache: this run still has them
        logger.warning("%s: cannot store the reference log-probabilities (%s); a later run computes them again", path, exc)
    return values

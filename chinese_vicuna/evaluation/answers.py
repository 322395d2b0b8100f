"""Answers to MT-bench-format questions, in FastChat's answer format, from a local model or an endpoint.

Questions: `question_id`, `category`, `turns` (one string per user turn). Answers:
`{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}`,
one line per question. Every turn is asked after the earlier turns and the model's own answers
to them: locally through `Engine` (the prompt ids inference uses everywhere), at an endpoint as
a growing `messages` list.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chinese_vicuna.endpoint import chat_completion
from chinese_vicuna.infer.decoding import DecodingArguments
from chinese_vicuna.infer.engine import Engine


def answer_record(question_id: Any, model_id: str, turns: Sequence[str]) -> dict[str, Any]:
    """One line of a FastChat answer file."""
    return {
        "question_id": question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": list(turns)}],
        "tstamp": time.time(),
    }


def local_turns(
    engine: Engine,
    questions: Sequence[str],
    decoding: DecodingArguments,
    system: str | None = None,
    max_memory: int | None = None,
) -> list[str]:
    """The model's answer to each turn, asked after the earlier turns and its own answers; stops at an empty one."""
    history: list[dict[str, str]] = []
    answers = []
    for question in questions:
        ids, _ = engine.chat_ids(history, question, system, max_memory)
        answer = engine.answer(ids, decoding)
        answers.append(answer)
        if not answer.strip():
            break  # no later turn is asked after an empty reply: the question is asked again on a rerun
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return answers


def endpoint_turns(
    client: Any, model: str, questions: Sequence[str], temperature: float = 0.0, max_tokens: int = 1024, system: str | None = None
) -> list[str]:
    """The endpoint model's answer to each turn, the conversation so far sent each time; stops at an empty one."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    answers = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        answer = chat_completion(client, model, messages, temperature=temperature, max_tokens=max_tokens)
        answers.append(answer)
        if not answer.strip():  # `content: null` or "": no later turn is paid for, a rerun asks again
            break
        messages.append({"role": "assistant", "content": answer})
    return answers


def answered_ids(path: Path, model_id: str) -> set[Any]:
    """Question ids `model_id` already has an answer to in `path` (a rerun skips them)."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # a torn last line from a killed run
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    ids = set()
    for line in data.decode("utf-8").split("\n"):
        if line.strip():
            rec = json.loads(line)
            if rec.get("model_id") == model_id:
                ids.add(rec["question_id"])
    return ids

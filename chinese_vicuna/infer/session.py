"""The chat session shared by every chat front end (web page, terminal, API): the model, the
chat templates it can be asked in, the history budget, a streamed reply, and saved conversations
in the chat data format the fine-tuning scripts read (`{"messages": [...]}` JSON lines)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chinese_vicuna.args import ChatSessionArguments, DecodingArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.infer.engine import Engine, chat_templates
from chinese_vicuna.infer.generation import GenerationStats
from chinese_vicuna.infer.jsonl import JsonlAppender
from chinese_vicuna.prompts import PromptTemplate

Message = dict[str, str]


class ChatSession:
    """What the page, the terminal (and an API) share: the engine, the chat templates it may be
    asked in, the history budget, and a streamed reply."""

    def __init__(self, engine: Engine, settings: ChatSessionArguments, decoding: DecodingArguments) -> None:
        if not engine.template.is_chat:
            raise UserError(
                f"template {engine.template.name!r} is an instruction template; chat needs a chat template "
                "(e.g. --prompt_template chinese-vicuna-chat)"
            )
        self.engine, self.settings, self.decoding = engine, settings, decoding
        self.model, self.tokenizer = engine.model, engine.tokenizer
        self.templates = chat_templates(engine.tokenizer, engine.template)
        self.default_template = engine.template.name

    def system_of(self, template_name: str, system: str | None) -> str:
        template = self.templates[template_name]
        return template.default_system if system is None else system

    def prompt(
        self,
        history: list[Message],
        question: str,
        template_name: str | None = None,
        system: str | None = None,
        max_memory: int | None = None,
    ) -> tuple[list[int], PromptTemplate, str]:
        """Prompt ids for `question` after `history` within the budget, and a note if turns were dropped."""
        template = self.templates[template_name or self.default_template]
        budget = max_memory if max_memory is not None else self.settings.max_memory
        ids, dropped = self.engine.chat_ids(history, question, self.system_of(template.name, system), budget, template)
        return ids, template, f"dropped the {dropped} oldest turn(s) to fit max_memory={budget}" if dropped else ""

    def stream(
        self,
        ids: list[int],
        template: PromptTemplate,
        decoding: DecodingArguments | None = None,
        stop_event: Any = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """The answer in pieces (see stream_generate); chat answers are stripped."""
        return self.engine.stream_answer(ids, decoding or self.decoding, template, stop_event, stats)


def conversation_record(history: list[Message], system: str) -> dict[str, list[Message]]:
    """One saved conversation: OpenAI-style messages, the system prompt first if any."""
    return {"messages": ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in history]}


def keeps_answer(text: str, stats: GenerationStats | None = None) -> bool:
    """Whether an answer joins the conversation: an empty or stopped one does not (saved, it
    would train the model to say nothing or to stop mid-sentence)."""
    return bool(text.strip()) and (stats is None or stats.stopped_by != "stop_signal")


def save_conversation(path: str | Path, history: list[Message], system: str, append: bool = True) -> Path:
    """The conversation as one JSON line: appended (a file the user names collects many
    conversations), or with `append=False` as the file's whole content."""
    if not history:
        raise UserError("nothing to save yet: the conversation is empty")
    if append:
        with JsonlAppender(path) as out:
            out.write(conversation_record(history, system))
    else:
        atomic_write_text(path, json.dumps(conversation_record(history, system), ensure_ascii=False) + "\n")
    return Path(path)

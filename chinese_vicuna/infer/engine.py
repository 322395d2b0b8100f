"""The one inference path: a loaded model, its template, messages → prompt ids → answer text.

    from chinese_vicuna import Engine

    engine = Engine("path/to/llama-7b-hf", lora_weights="lora-Vicuna")
    engine.generate([{"role": "user", "content": "中国的首都是哪里？"}], max_new_tokens=256)

Every front end goes through an `Engine`: generate.py (page and file mode), chat.py (page and
terminal, through `ChatSession`), serve.py's API (prompts here, decoding in its batched engine),
tools/gen_model_answer.py and evaluation answers, tools/cpu_chat.py (a GGUF through llama.cpp:
the same prompt ids, llama.cpp's tokenizer). No front end renders a template or tokenizes a
prompt itself, so a model is asked with the same ids whichever way it is reached.

The template, resolved once (`model_template`), by one rule:
1. the template asked for (`--prompt_template`), with a warning when it renders differently from
   the one saved with the model;
2. else the `prompt_template.json` saved beside the adapter, else beside the (merged) model
   (a GGUF file carries it in its metadata);
3. else the default of the front end's kind (`DEFAULT_TEMPLATES`): `alpaca` for instructions
   (generate.py, serve.py, this class), `chinese-vicuna-chat` for conversations (chat.py,
   tools/cpu_chat.py, tools/gen_model_answer.py).
A LoRA served beside a base (serve.py, tools/gen_model_answer.py, whose --prompt_template has a
default value and so names the base's template) is asked in the template saved with it, else
in the base's (`adapter_template`).

Messages are `{"role": "system"|"user"|"assistant", "content": str}` (the QLoRA-65B projects'
`"text"` key works too). With an instruction template (alpaca, chinese-alpaca) the conversation
must be one user message, optionally after a system message: it is the instruction. With a chat
template the last message is the question and the ones before it the history.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.data.encode import encode_segments
from chinese_vicuna.data.fast_tokenize import protect_messages
from chinese_vicuna.devices import resolve_precision
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import GenerationStats, chat_prompt_ids, finish_text, generate_text, prompt_ids, stream_generate
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.prompts import PromptTemplate, available_templates, load_template, resolve_template, saved_template

if TYPE_CHECKING:
    from chinese_vicuna.infer.rollouts import Rollouts

INSTRUCTION, CHAT = "instruction", "chat"
# The template a model is asked in when none is asked for and none was saved with it.
DEFAULT_TEMPLATES = {INSTRUCTION: "alpaca", CHAT: "chinese-vicuna-chat"}


def model_template(
    requested: str | None,
    folders: Sequence[str | Path | None] = (),
    kind: str | None = INSTRUCTION,
    tokenizer: Any = None,
    saved: PromptTemplate | None = None,
) -> PromptTemplate | None:
    """The template to ask a model in (the rule in the module docstring): `requested`, else the one
    saved in the first of `folders` that has one (or `saved`, read elsewhere, e.g. from a GGUF),
    else `DEFAULT_TEMPLATES[kind]`; None only for `kind` None with nothing saved (merge_lora.py)."""
    if kind is not None and kind not in DEFAULT_TEMPLATES:
        raise ValueError(f"kind must be one of {sorted(DEFAULT_TEMPLATES)} or None, not {kind!r}")
    if saved is None:
        saved = saved_template(folders, tokenizer)
    return resolve_template(requested, saved, DEFAULT_TEMPLATES[kind] if kind else None, tokenizer)


def adapter_template(adapter_dir: str | Path, base_template: PromptTemplate, tokenizer: Any = None) -> PromptTemplate:
    """The template of a LoRA served beside a base: the one saved with it, else the base's."""
    return saved_template([adapter_dir], tokenizer) or base_template


def chat_templates(tokenizer: Any, first: PromptTemplate) -> dict[str, PromptTemplate]:
    """`first`, then every built-in chat template (`auto` where the tokenizer has a chat_template):
    what a chat page offers."""
    templates = {first.name: first}
    for name in available_templates():
        if name == "auto" and not getattr(tokenizer, "chat_template", None):
            continue
        candidate = load_template(name, tokenizer)
        if candidate.is_chat:
            templates.setdefault(name, candidate)
    return templates


class Engine:
    """A model and its template: messages → prompt ids → answer text, for every front end.

    `Engine(base_model, ...)` loads the model; a recipe that loads it in view wraps it with
    `Engine.around` (resolving the template) or `Engine.for_model` (a template already chosen).
    Methods taking `template` use the engine's own when it is None (the chat page and the API
    ask some requests in another one).
    """

    def __init__(
        self,
        base_model: str,
        lora_weights: str | None = None,
        prompt_template: str | None = None,
        precision: str = "auto",
        device_map: Any = None,
        tokenizer_path: str | None = None,
        kind: str = INSTRUCTION,
    ) -> None:
        model, tokenizer = load_for_inference(base_model, lora_weights, resolve_precision(precision), device_map, tokenizer_path)
        self._set(model, tokenizer, model_template(prompt_template, [lora_weights, base_model], kind, tokenizer))

    def _set(self, model: Any, tokenizer: Any, template: PromptTemplate) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, template: PromptTemplate) -> Engine:
        """An engine over a loaded model (None: prompts only, where another loop decodes, as
        serve.py's batched engine does) in `template`."""
        engine = cls.__new__(cls)
        engine._set(model, tokenizer, template)
        return engine

    @classmethod
    def around(
        cls,
        model: Any,
        tokenizer: Any,
        prompt_template: str | None,
        folders: Sequence[str | Path | None],
        kind: str,
    ) -> Engine:
        """An engine over a loaded model, in the template `model_template` picks: `prompt_template`,
        else the one saved in `folders` (adapter first, then the model), else the kind's default."""
        return cls.for_model(model, tokenizer, model_template(prompt_template, folders, kind, tokenizer))

    # --- messages → prompt ids ------------------------------------------------------------------
    def instruction_ids(self, instruction: str, input: str = "", template: PromptTemplate | None = None) -> list[int]:
        """`[bos] + prompt` of an instruction (and its input), as in training."""
        return prompt_ids(self.tokenizer, template or self.template, instruction, input)

    def chat_ids(
        self,
        history: Sequence[dict[str, str]],
        question: str,
        system: str | None = None,
        max_memory: int | None = None,
        template: PromptTemplate | None = None,
    ) -> tuple[list[int], int]:
        """`question` after `history` within `max_memory` tokens, and how many old turns were dropped."""
        return chat_prompt_ids(self.tokenizer, template or self.template, history, question, system, max_memory)

    def conversation_ids(self, messages: Sequence[dict[str, str]], template: PromptTemplate | None = None) -> list[int]:
        """A whole conversation (a leading system message included) in a chat template, with the
        assistant prefix after it: what `apply_chat_template(..., add_generation_prompt=True)` feeds."""
        template = template or self.template
        # special-token text in messages stays text, as in training
        ids, _ = encode_segments(self.tokenizer, template.chat_segments(protect_messages(self.tokenizer, list(messages))))
        return ids

    def text_ids(self, text: str) -> list[int]:
        """Raw text as a completion prompt: BOS + the text, as vLLM's /v1/completions takes it."""
        return list(self.tokenizer(text)["input_ids"])

    def prompt_ids(self, messages: Sequence[dict[str, str]], max_memory: int | None = None) -> list[int]:
        """The ids the model is given for `messages` (see the module docstring)."""
        messages = [{"role": m["role"], "content": m["content"] if "content" in m else m["text"]} for m in messages]
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        if not turns or turns[-1]["role"] != "user":
            raise UserError("the conversation must end with a user message (the question to answer)")
        if not self.template.is_chat:
            if len(turns) != 1:
                raise UserError(
                    f"template {self.template.name!r} is an instruction template: give one user message (the instruction), "
                    f"not {len(turns)} messages; or use a chat template"
                )
            return self.instruction_ids(turns[0]["content"])
        ids, _ = self.chat_ids(turns[:-1], turns[-1]["content"], system, max_memory)
        return ids

    # --- prompt ids → answer text ---------------------------------------------------------------
    def answer(
        self,
        ids: Sequence[int],
        decoding: DecodingArguments | None = None,
        template: PromptTemplate | None = None,
        stop_event: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> str:
        """The answer to prompt `ids`, not streamed: cut at the template's stop strings (stripped for chat)."""
        template = template or self.template
        return generate_text(self.model, self.tokenizer, ids, decoding, template.stop_strings, template.is_chat, stop_event, stats)

    def stream_answer(
        self,
        ids: Sequence[int],
        decoding: DecodingArguments | None = None,
        template: PromptTemplate | None = None,
        stop_event: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """The same answer as text pieces while it is generated (see `stream_generate`)."""
        template = template or self.template
        return stream_generate(self.model, self.tokenizer, ids, decoding, template.stop_strings, template.is_chat, stop_event, stats)

    def answer_in_batches(
        self,
        prompts: Sequence[Sequence[int]],
        decoding: DecodingArguments,
        batch_size: int,
        on_window: Callable[[int, list[str]], None],
    ) -> None:
        """Answers of many prompts, length-sorted micro-batches (generate.py's file mode); each
        window's answers go to `on_window(start, answers)` in input order."""
        from chinese_vicuna.infer.batch_generate import answer_in_batches

        template = self.template
        answer_in_batches(self.model, self.tokenizer, prompts, decoding, template.stop_strings, template.is_chat, batch_size, on_window)

    def sample_groups(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[Sequence[dict[str, str]]],
        num_generations: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: Any = None,
    ) -> Rollouts:
        """`num_generations` sampled completions of each prompt (GRPO's rollouts; `infer/rollouts.py`),
        with the model's current adapter weights. `prompts` are prompt ids or conversations (as
        `prompt_ids` takes them). `texts` holds each completion as `answer` shows it (stop strings cut)."""
        from chinese_vicuna.infer.rollouts import sample_groups

        ids = [self.prompt_ids(p) if p and isinstance(p[0], dict) else list(p) for p in prompts]
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rollouts = sample_groups(
            self.model, ids, num_generations, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, generator=generator,
        )  # fmt: skip
        rollouts.texts = self.completion_texts(rollouts.completion_ids)
        return rollouts

    def completion_texts(self, completion_ids: Sequence[Sequence[int]]) -> list[str]:
        """Each completion's ids as `answer` shows the answer (special tokens dropped, stop strings cut)."""
        tokenizer, template = self.tokenizer, self.template
        return [
            finish_text(
                tokenizer.decode(c, skip_special_tokens=True, clean_up_tokenization_spaces=False), template.stop_strings, template.is_chat
            )
            for c in completion_ids
        ]

    # --- the public one-call form -----------------------------------------------------------------
    def generate(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 256, **decoding: Any) -> str:
        """The answer, greedy unless `decoding` (DecodingArguments' fields) says otherwise."""
        return self.answer(self.prompt_ids(messages), DecodingArguments(max_new_tokens=max_new_tokens, **decoding))

    def stream(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 256, **decoding: Any) -> Iterator[str]:
        """The same answer as text pieces while it is generated."""
        return self.stream_answer(self.prompt_ids(messages), DecodingArguments(max_new_tokens=max_new_tokens, **decoding))

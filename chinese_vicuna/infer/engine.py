"""The public Python entry point: load a base (+ LoRA) or a merged model once, then generate from
a list of messages, in the template the model was trained with.

    from chinese_vicuna import Engine

    engine = Engine("path/to/llama-7b-hf", lora_weights="lora-Vicuna")
    engine.generate([{"role": "user", "content": "中国的首都是哪里？"}], max_new_tokens=256)

Messages are `{"role": "system"|"user"|"assistant", "content": str}` (the QLoRA-65B projects'
`"text"` key works too). With an instruction template (alpaca, chinese-alpaca) the conversation
must be one user message, optionally after a system message: it is the instruction. With a chat
template the last message is the question and the ones before it the history.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.devices import resolve_precision
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import chat_prompt_ids, generate_text, prompt_ids, stream_generate
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.prompts import resolve_template, saved_template


class Engine:
    """A loaded model and its template; `generate` and `stream` answer a conversation."""

    def __init__(
        self,
        base_model: str,
        lora_weights: str | None = None,
        prompt_template: str | None = None,
        precision: str = "auto",
        device_map: Any = None,
        tokenizer_path: str | None = None,
    ) -> None:
        self.model, self.tokenizer = load_for_inference(base_model, lora_weights, resolve_precision(precision), device_map, tokenizer_path)
        saved = saved_template([lora_weights, base_model], self.tokenizer)
        self.template = resolve_template(prompt_template, saved, "alpaca", self.tokenizer)

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
            return prompt_ids(self.tokenizer, self.template, turns[0]["content"])
        ids, _ = chat_prompt_ids(self.tokenizer, self.template, turns[:-1], turns[-1]["content"], system, max_memory)
        return ids

    def generate(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 256, **decoding: Any) -> str:
        """The answer, greedy unless `decoding` (DecodingArguments' fields) says otherwise."""
        settings = DecodingArguments(max_new_tokens=max_new_tokens, **decoding)
        ids = self.prompt_ids(messages)
        return generate_text(self.model, self.tokenizer, ids, settings, self.template.stop_strings, strip=self.template.is_chat)

    def stream(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 256, **decoding: Any) -> Iterator[str]:
        """The same answer as text pieces while it is generated."""
        settings = DecodingArguments(max_new_tokens=max_new_tokens, **decoding)
        ids = self.prompt_ids(messages)
        return stream_generate(self.model, self.tokenizer, ids, settings, self.template.stop_strings, self.template.is_chat)

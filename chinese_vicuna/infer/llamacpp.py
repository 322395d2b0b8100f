"""llama.cpp (llama-cpp-python) as an inference engine for GGUF files: its tokenizer behind the
slice of the HF tokenizer API that prompt building and incremental decoding use, so prompts are
built exactly as in training, and streamed answers with the same UTF-8 and stop-string handling."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from chinese_vicuna.data.fast_tokenize import GGUF_FOLDS_SPACE_KEY, GGUF_RESTARTS_KEY, encode_continuations
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.engine import Engine, model_template
from chinese_vicuna.infer.generation import AnswerText
from chinese_vicuna.prompts import GGUF_TEMPLATE_KEY, PromptTemplate, saved_template, template_from_json


class LlamaCppTokenizer:
    """The slice of a HF tokenizer that encode_segments / IncrementalDecoder use, over llama.cpp."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.bos_token_id = llm.token_bos()
        self.eos_token_id = llm.token_eos()
        self.pad_token_id = self.eos_token_id
        self.specials = {self.bos_token_id, self.eos_token_id}
        self.special_ids = {llm._model.token_get_text(i): i for i in self.specials}
        self.special_split = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")
        # How the HF tokenizer of the file begins text (export/gguf.py records it; files without
        # the keys: the default transformers 5 form after a special token, llama.cpp's own at a
        # leading space): text after a special token continues, or starts anew (`"legacy": true`)
        metadata = getattr(llm, "metadata", None) or {}
        self.restarts_after_special = str(metadata.get(GGUF_RESTARTS_KEY, "false")).lower() == "true"
        self.folds_leading_space = str(metadata.get(GGUF_FOLDS_SPACE_KEY, "false")).lower() == "true"

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        """As the HF tokenizer: "<s>" / "</s>" in the text (vicuna_v1.1, llama2 templates) become
        their ids, and the text after one continues with no space prefix unless the HF tokenizer
        starts it anew there (llama.cpp's own special=True parsing always does, so ids would
        differ from training); with `split_special_tokens` (user text,
        data/fast_tokenize.LiteralSpecials) they are encoded as the characters they are."""
        ids = [self.bos_token_id] if add_special_tokens else []
        if split_special_tokens:
            return ids + self.start_ids(text)
        for i, part in enumerate(self.special_split.split(text)):
            if i % 2:
                ids.append(self.special_ids[part])
            elif part and (i == 0 or self.restarts_after_special):
                ids.extend(self.start_ids(part))
            elif part:
                ids.extend(encode_continuations(self, [part])[0])
        return ids

    def start_ids(self, text: str) -> list[int]:
        """`text` as the start of a text: llama.cpp's dummy prefix, a leading space folded into
        it where the HF tokenizer does that."""
        if self.folds_leading_space and text.startswith(" "):
            text = text[1:]
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False, split_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens, split_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens, split_special_tokens) for t in texts]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.specials)]
        text = self.llm.detokenize(ids).decode("utf-8", errors="replace")
        # as HF's sentencepiece decoding: the space the tokenizer prefixed to the text is dropped
        return text[1:] if text.startswith(" ") else text


def load_gguf(path: str, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt (it compiles llama.cpp)") from None
    if not Path(path).is_file():
        raise UserError(f"{path}: GGUF file not found (make one with tools/convert_to_gguf.py)")
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), logits_all=logits_all, verbose=False)


def gguf_template(llm: Any, path: str, requested: str | None, kind: str) -> PromptTemplate:
    """The template a GGUF file was trained with (carried in its metadata by export/gguf.py, or a
    prompt_template.json beside it), unless --prompt_template names one; else the kind's default
    (`engine.model_template`'s rule)."""
    text = (getattr(llm, "metadata", None) or {}).get(GGUF_TEMPLATE_KEY)
    saved = template_from_json(text, f"{path}: {GGUF_TEMPLATE_KEY}") if text else saved_template([Path(path).parent])
    return model_template(requested, (), kind, None, saved)


def stream_tokens(
    llm: Any, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int, repeat_penalty: float
) -> Iterator[int]:
    """Token ids from llama.cpp's sampler (greedy when temperature is 0), ending before EOS."""
    eos = llm.token_eos()
    for n, token in enumerate(llm.generate(ids, temp=temperature, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, reset=True)):
        if token == eos or n >= max_new_tokens:
            return
        yield token


def stream_answer(
    llm: Any, tokenizer: LlamaCppTokenizer, ids: list[int], stop_strings: Sequence[str], strip: bool, **decoding: Any
) -> Iterator[str]:
    """Text pieces of the answer: UTF-8-safe (byte tokens held until a character is whole), cut at stop strings."""
    text = AnswerText(tokenizer, stop_strings, strip)
    for token in stream_tokens(llm, ids, **decoding):
        piece = text.push([token])
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.finish()
    if tail:
        yield tail


def greedy_answer(
    llm: Any, tokenizer: LlamaCppTokenizer, template: Any, instruction: str, input: str = "", max_new_tokens: int = 256
) -> str:
    """One instruction's answer, greedy (what tests compare with the trained output)."""
    ids = Engine.for_model(llm, tokenizer, template).instruction_ids(instruction, input)
    pieces = stream_answer(
        llm,
        tokenizer,
        ids,
        template.stop_strings,
        template.is_chat,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        repeat_penalty=1.0,
    )
    return "".join(pieces)

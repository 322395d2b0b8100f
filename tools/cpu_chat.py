"""Streaming terminal chat on a GGUF file through llama.cpp (CPU), with the training templates.

    python tools/cpu_chat.py model-q4_0.gguf --prompt_template chinese-vicuna-chat
    python tools/cpu_chat.py model.gguf --prompt_template alpaca      # one instruction per line

Prompts are built exactly as in training (every template segment tokenized separately, ids
concatenated), here with llama.cpp's tokenizer read from the GGUF file. A chat template keeps
the history, dropping the oldest whole turns when it outgrows --max_memory tokens; an
instruction template answers each line on its own. Commands: /reset, /exit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.generation import IncrementalDecoder, StopStringFilter, chat_prompt_ids, prompt_ids
from chinese_vicuna.prompts import load_template


class LlamaCppTokenizer:
    """The slice of a HF tokenizer that encode_segments / IncrementalDecoder use, over llama.cpp."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.bos_token_id = llm.token_bos()
        self.eos_token_id = llm.token_eos()
        self.pad_token_id = self.eos_token_id
        self.specials = {self.bos_token_id, self.eos_token_id}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.specials)]
        text = self.llm.detokenize(ids).decode("utf-8", errors="replace")
        # as HF's sentencepiece decoding: the space the tokenizer prefixed to the text is dropped
        return text[1:] if text.startswith(" ") else text


def load_gguf(path: str, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt (compiles ~3 min)") from None
    if not Path(path).is_file():
        raise UserError(f"{path}: GGUF file not found (make one with tools/convert_to_gguf.py)")
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), logits_all=logits_all, verbose=False)


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
    decoder = IncrementalDecoder(tokenizer)
    stops = StopStringFilter(stop_strings, strip)
    for token in stream_tokens(llm, ids, **decoding):
        piece = stops.push(decoder.push([token]))
        if piece:
            yield piece
        if stops.stopped:
            return
    tail = stops.push(decoder.flush()) + stops.flush()
    if tail:
        yield tail


def greedy_answer(
    llm: Any, tokenizer: LlamaCppTokenizer, template: Any, instruction: str, input: str = "", max_new_tokens: int = 256
) -> str:
    """One instruction's answer, greedy (what tests compare with the trained output)."""
    ids = prompt_ids(tokenizer, template, instruction, input)
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="GGUF model file (tools/convert_to_gguf.py)")
    p.add_argument("--prompt_template", default="chinese-vicuna-chat", help="the template the model was trained with")
    p.add_argument("--system", default=None, help="chat templates: system prompt (default: the template's)")
    p.add_argument("--n_ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--max_memory", type=int, default=None, help="prompt token budget (default n_ctx - max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--repeat_penalty", type=float, default=1.0)
    p.add_argument("--show_speed", action="store_true", help="print tokens/s after each answer (stderr)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    llm = load_gguf(args.gguf, args.n_ctx, args.threads)
    tokenizer = LlamaCppTokenizer(llm)
    template = load_template(args.prompt_template, None)
    budget = args.max_memory or args.n_ctx - args.max_new_tokens
    decoding = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k if args.temperature > 0 else 1,
        "repeat_penalty": args.repeat_penalty,
    }
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("User: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        question = line.rstrip("\n")
        if not question.strip():
            continue
        if question.strip() == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if template.is_chat:
            ids, dropped = chat_prompt_ids(tokenizer, template, history, question, args.system, budget)
            if dropped:
                print(f"(dropped the {dropped} oldest turn(s) to fit {budget} tokens)", file=sys.stderr, flush=True)
        else:
            ids = prompt_ids(tokenizer, template, question)
        if interactive:
            print("Assistant: ", end="", flush=True)
        start, text = time.time(), ""
        for piece in stream_answer(llm, tokenizer, ids, template.stop_strings, template.is_chat, **decoding):
            text += piece
            print(piece, end="", flush=True)
        print(flush=True)
        if args.show_speed:
            n = len(tokenizer.encode(text)) if text else 0
            print(f"({n} tokens, {n / max(time.time() - start, 1e-9):.1f} tokens/s)", file=sys.stderr, flush=True)
        if template.is_chat:
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    llm.close()  # free llama.cpp's model now, not in a destructor at interpreter exit


if __name__ == "__main__":
    main()

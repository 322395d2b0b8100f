"""Streaming terminal chat on a GGUF file through llama.cpp (CPU), with the training templates.

    python tools/cpu_chat.py --gguf model-q4_0.gguf --prompt_template chinese-vicuna-chat
    python tools/cpu_chat.py --gguf model.gguf --prompt_template alpaca      # one instruction per line

Prompts are built exactly as in training (every template segment tokenized separately, ids
concatenated), here with llama.cpp's tokenizer read from the GGUF file. A chat template keeps
the history, dropping the oldest whole turns when it outgrows --max_memory tokens; an
instruction template answers each line on its own. Commands: /reset, /exit (or Ctrl-D, or Ctrl-C
at the prompt); Ctrl-C during an answer stops that answer. Arrow keys edit the line, ↑/↓ recall
earlier ones (this chat's only; nothing is written to disk). A --max_new_tokens that leaves no
room for a prompt in --n_ctx is lowered to half of it, with a message.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from chinese_vicuna.args import ChatSessionArguments, ChatTemplateArguments, DecodingArguments, parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.engine import CHAT, Engine
from chinese_vicuna.infer.i18n import Messages
from chinese_vicuna.infer.llamacpp import LlamaCppTokenizer, gguf_template, load_gguf, stream_answer
from chinese_vicuna.infer.session import keeps_answer
from chinese_vicuna.infer.terminal import ChatEnded, enable_line_editing, print_answer, read_line


@dataclass
class LlamaCppArguments:
    gguf: str = field(metadata={"help": "GGUF model file (tools/convert_to_gguf.py)."})
    n_ctx: int = field(default=2048, metadata={"help": "Context length llama.cpp allocates."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: llama.cpp's choice)."})
    show_speed: bool = field(default=False, metadata={"help": "Print tokens/s after each answer (stderr)."})


@dataclass
class CpuChatSessionArguments(ChatSessionArguments):
    max_memory: int | None = field(default=None, metadata={"help": "Prompt token budget (default n_ctx - max_new_tokens)."})

    def __post_init__(self) -> None:
        if self.max_memory is not None:
            super().__post_init__()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, template_args, session_args, decoding = parse_args(
        (LlamaCppArguments, ChatTemplateArguments, CpuChatSessionArguments, DecodingArguments), argv
    )
    decoding.validate()
    logging.basicConfig(level=logging.WARNING)
    t = Messages("en")

    llm = load_gguf(model_args.gguf, model_args.n_ctx, model_args.threads)
    tokenizer = LlamaCppTokenizer(llm)
    template = gguf_template(llm, model_args.gguf, template_args.prompt_template, CHAT)
    engine = Engine.for_model(llm, tokenizer, template)  # prompt ids as everywhere; llama.cpp decodes
    max_new_tokens = decoding.max_new_tokens
    if max_new_tokens >= model_args.n_ctx:  # no room left for a prompt: half the context each
        max_new_tokens = model_args.n_ctx // 2
        print(t("cli.max_new_tokens_clamped", asked=decoding.max_new_tokens, n_ctx=model_args.n_ctx, used=max_new_tokens), file=sys.stderr)
    budget = session_args.max_memory or model_args.n_ctx - max_new_tokens
    sampling = {
        "temperature": decoding.temperature if decoding.do_sample else 0.0,  # llama.cpp: 0 = greedy
        "top_p": decoding.top_p,
        "top_k": decoding.top_k if decoding.do_sample else 1,
        "repeat_penalty": decoding.repetition_penalty,
    }
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    enable_line_editing()
    code = 0
    while True:
        try:
            question = read_line("User: " if interactive else "", t)
        except ChatEnded as end:
            if interactive:
                print(t("cli.bye"), flush=True)
            code = end.code
            break
        if question.strip() == "/exit":
            break
        if not question.strip():
            continue
        if question.strip() == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        try:
            if template.is_chat:
                ids, dropped = engine.chat_ids(history, question, session_args.system, budget)
                if dropped:
                    print(f"(dropped the {dropped} oldest turn(s) to fit {budget} tokens)", file=sys.stderr, flush=True)
            else:
                ids = engine.instruction_ids(question)
        except UserError as exc:  # this line is too long: say so, the chat goes on
            print(f"[{exc}]", flush=True)
            continue
        if interactive:
            print("Assistant: ", end="", flush=True)
        start = time.time()
        # what is left of the context after the prompt bounds the answer (a longer one is an error in llama.cpp)
        room = max(1, min(max_new_tokens, model_args.n_ctx - len(ids)))
        text, stopped = print_answer(
            stream_answer(llm, tokenizer, ids, template.stop_strings, template.is_chat, max_new_tokens=room, **sampling)
        )
        if stopped:
            print(t("cli.stopped"), flush=True)
        if model_args.show_speed:
            n = len(tokenizer.encode(text)) if text else 0
            print(f"({n} tokens, {n / max(time.time() - start, 1e-9):.1f} tokens/s)", file=sys.stderr, flush=True)
        if template.is_chat and not stopped and keeps_answer(text):  # a stopped or empty answer is not kept
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    llm.close()  # free llama.cpp's model now, not in a destructor at interpreter exit
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()

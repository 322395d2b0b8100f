"""llama-cpp-python's OpenAI server for one GGUF, asking the model in our template.

    python -m chinese_vicuna.serving.llamacpp_server --gguf model.gguf --prompt_template alpaca [--port 8000]

(`serve.py --engine llamacpp --gguf FILE` runs this.) The app is llama-cpp-python's own
(`llama_cpp.server.app.create_app`); what this adds is a chat format named after the template,
rendered by llama-cpp-python's Jinja formatter from `PromptTemplate.jinja`, with the template's stop
strings, so that a client gets the same answers as from serve.py. The key is read from
$CHINESE_VICUNA_API_KEY (never from the command line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.engine import INSTRUCTION, model_template
from chinese_vicuna.serving.launch import API_KEY_ENV


def register_template_format(template_name: str) -> str:
    """Register our template as a llama-cpp-python chat format; returns the format's name."""
    from llama_cpp import llama_chat_format

    template = model_template(template_name, (), INSTRUCTION)
    stops = template.stop_strings

    class TemplateFormatter(llama_chat_format.Jinja2ChatFormatter):
        def __call__(self, *, messages: list[Any], **kwargs: Any) -> Any:
            response = super().__call__(messages=messages, **kwargs)
            given = response.stop if isinstance(response.stop, list) else [response.stop] if response.stop else []
            response.stop = [*given, *stops]
            return response

    name = f"chinese-vicuna-{template.name}"
    # BOS in the text, then the text as the file's HF tokenizer reads it after BOS: a space where
    # that tokenizer continues the text after a special token (transformers 5's default LLaMA
    # form), as it is where it starts the text anew there (`"legacy": true`, tokenizer.json's
    # pipeline; the GGUF records which). The rendered chat is tokenized as HF does
    # (HFTokenizedChat), so the ids are the training ids in history too.
    handlers = {
        join: TemplateFormatter(
            template=template.jinja(bos=True, single_instruction=True, after_bos=join), eos_token="</s>", bos_token="<s>"
        ).to_chat_handler()
        for join in ("space", "plain")
    }

    def hf_tokenized_handler(*, llama: Any, **kwargs: Any) -> Any:
        chat = HFTokenizedChat(llama)
        return handlers["plain" if chat._tokenizer.restarts_after_special else "space"](llama=chat, **kwargs)

    llama_chat_format.LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, hf_tokenized_handler, overwrite=True)
    return name


class HFTokenizedChat:
    """A `Llama` whose tokenization of a rendered chat (text with its special tokens, no BOS
    added) is HF's: llama.cpp's own puts its dummy-prefix "▁" after every special token, so
    `</s>USER:` in a vicuna_v1.1 history would not be the ids the model was trained on
    (docs/export.md). Everything else is the `Llama` itself."""

    def __init__(self, llama: Any) -> None:
        from chinese_vicuna.infer.llamacpp import LlamaCppTokenizer

        self._llama = llama
        self._tokenizer = LlamaCppTokenizer(llama)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if special and not add_bos:
            return self._tokenizer.encode(text.decode("utf-8"))
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)


@dataclass
class GgufServerArguments:
    gguf: str = field(metadata={"help": "The GGUF file to serve."})
    served_model_name: str | None = field(default=None, metadata={"help": "The model's name in the API (default: the file's name)."})
    n_ctx: int = field(default=2048, metadata={"help": "Context length."})
    n_threads: int | None = field(default=None, metadata={"help": "CPU threads (default: llama.cpp's)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from chinese_vicuna.args import ApiServerArguments, TemplateArguments, parse_args

    template_args, listen, args = parse_args((TemplateArguments, ApiServerArguments, GgufServerArguments), argv)
    if not os.path.isfile(args.gguf):
        raise UserError(f"--gguf {args.gguf}: no such file (make one with tools/convert_to_gguf.py)")
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt") from None

    chat_format = register_template_format(template_args.template_or_fallback)
    alias = args.served_model_name or os.path.splitext(os.path.basename(args.gguf))[0]
    model = ModelSettings(model=args.gguf, model_alias=alias, n_ctx=args.n_ctx, chat_format=chat_format, verbose=False)
    if args.n_threads:
        model.n_threads = args.n_threads
    # queue concurrent requests (llama-cpp-python interrupts the running one by default)
    server = ServerSettings(host=listen.host, port=listen.port, api_key=os.environ.get(API_KEY_ENV) or None, interrupt_requests=False)
    app = create_app(server_settings=server, model_settings=[model])
    uvicorn.run(app, host=listen.host, port=listen.port, log_level="info")


if __name__ == "__main__":
    main()

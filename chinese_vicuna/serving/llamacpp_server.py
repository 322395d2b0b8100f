"""llama-cpp-python's OpenAI server for one GGUF, asking the model in our template.

    python -m chinese_vicuna.serving.llamacpp_server --gguf model.gguf --prompt_template alpaca [--port 8000]

(`serve.py --engine llamacpp --gguf FILE` runs this.) The app is llama-cpp-python's own
(`llama_cpp.server.app.create_app`); what this adds is a chat format named after the template,
rendered by llama-cpp-python's Jinja formatter from `PromptTemplate.jinja`, with the template's stop
strings, so that a client gets the same answers as from serve.py. The key is read from
$CHINESE_VICUNA_API_KEY (never from the command line).
"""

from __future__ import annotations

import argparse
import os
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
    # BOS in the text, then the text as HF's converted LLaMA tokenizer reads it after BOS (the
    # vocabulary tools/convert_to_gguf.py writes); the rendered chat is tokenized as HF does
    # (HFTokenizedChat), so the ids are the training ids in history too
    jinja = template.jinja(bos=True, single_instruction=True, after_bos="space")
    formatter = TemplateFormatter(template=jinja, eos_token="</s>", bos_token="<s>")
    handler = formatter.to_chat_handler()

    def hf_tokenized_handler(*, llama: Any, **kwargs: Any) -> Any:
        return handler(llama=HFTokenizedChat(llama), **kwargs)

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


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--prompt_template", default="alpaca")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", default=None)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--n_threads", type=int, default=None)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.gguf):
        raise UserError(f"--gguf {args.gguf}: no such file (make one with tools/convert_to_gguf.py)")
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt") from None

    chat_format = register_template_format(args.prompt_template)
    alias = args.served_model_name or os.path.splitext(os.path.basename(args.gguf))[0]
    model = ModelSettings(model=args.gguf, model_alias=alias, n_ctx=args.n_ctx, chat_format=chat_format, verbose=False)
    if args.n_threads:
        model.n_threads = args.n_threads
    # queue concurrent requests (llama-cpp-python interrupts the running one by default)
    server = ServerSettings(host=args.host, port=args.port, api_key=os.environ.get(API_KEY_ENV) or None, interrupt_requests=False)
    app = create_app(server_settings=server, model_settings=[model])
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()

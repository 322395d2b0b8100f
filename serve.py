"""An OpenAI-compatible API over one base model and many LoRAs, with batched decoding.

    python serve.py --base_model BASE --lora_modules medical=./lora-med legal=./lora-law \\
        [--api_key KEY] [--host 127.0.0.1] [--port 8000] [--served_model_name NAME] \\
        [--max_loras 4] [--prompt_template alpaca] [--enable_lora_loading true --lora_root DIR]
    python serve.py --engine vllm --base_model BASE --lora_modules ...        # hand off to vLLM (GPU)
    python serve.py --engine llamacpp --gguf model.gguf                       # llama.cpp on the CPU

Clients pick a model by name (`model`: the base's served name or a LoRA's); each LoRA is asked
in the template saved with it (`prompt_template.json` in its folder), the base in
--prompt_template. The key comes from --api_key or $CHINESE_VICUNA_API_KEY and is never logged.
See docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chinese_vicuna.args import ApiServerArguments, ModelArguments, TemplateArguments, parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.model.rope import context_length
from chinese_vicuna.run import load_from_args
from chinese_vicuna.serving.adapters import AdapterRegistry, parse_lora_modules
from chinese_vicuna.serving.engine import BatchEngine
from chinese_vicuna.serving.launch import API_KEY_ENV, llamacpp_command, vllm_command
from chinese_vicuna.serving.openai_api import OpenAIServer, ServeLimits, create_app, serve_app

logger = logging.getLogger("serve")
ENGINE_STOP_SECONDS = 1  # on SIGTERM: how long the decoding step in progress may take to finish


@dataclass
class ServeArguments:
    lora_modules: list[str] = field(
        default_factory=list, metadata={"help": "LoRAs to serve: NAME=DIR ... (the name is the API's `model`).", "nargs": "*"}
    )
    api_key: str | None = field(
        default=None, metadata={"help": f"Require this key (Bearer) on every request; default ${API_KEY_ENV}, else none."}
    )
    served_model_name: str | None = field(default=None, metadata={"help": "The base model's name in the API (default: its folder name)."})
    max_loras: int = field(default=4, metadata={"help": "Most LoRAs held in memory at once; the least recently used goes first."})
    engine: str = field(default="builtin", metadata={"help": "builtin (this process), vllm (GPU) or llamacpp (a GGUF on the CPU)."})
    gguf: str | None = field(default=None, metadata={"help": "--engine llamacpp: the GGUF file to serve."})
    max_batch_size: int = field(default=16, metadata={"help": "Most requests decoded together in one step."})
    max_queue: int = field(default=64, metadata={"help": "Most requests waiting for a batch slot; beyond it a 429."})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "Longest prompt accepted (tokens); beyond it a 400."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens of a chat request that gives none."})
    n_ctx: int = field(default=2048, metadata={"help": "--engine llamacpp: context length."})
    dry_run: bool = field(default=False, metadata={"help": "--engine vllm/llamacpp: print the command instead of running it."})
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU: torch threads for decoding (default: the cores less one, kept for the HTTP side)."}
    )
    enable_lora_loading: bool = field(
        default=False, metadata={"help": "Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --lora_root)."}
    )
    lora_root: str | None = field(default=None, metadata={"help": "--enable_lora_loading: adapters load only from folders under it."})
    max_request_bytes: int = field(default=16 * 2**20, metadata={"help": "Largest request body accepted; beyond it a 413."})


def api_key_of(args: ServeArguments) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def lora_root_of(args: ServeArguments) -> str | None:
    """The folder run-time adapters load from; None when run-time loading is off."""
    if not args.enable_lora_loading:
        if args.lora_root:
            raise UserError("--lora_root is used with --enable_lora_loading true; add it, or leave --lora_root out")
        return None
    if not args.lora_root:
        raise UserError("--enable_lora_loading true needs --lora_root DIR: the folder under which adapters may be loaded")
    if not Path(args.lora_root).is_dir():
        raise UserError(f"--lora_root {args.lora_root}: no such folder")
    return args.lora_root


def hand_off(model_args: ModelArguments, template: str, listen: ApiServerArguments, args: ServeArguments) -> None:
    """Run vLLM's or llama-cpp-python's OpenAI server with the same names and key."""
    modules = parse_lora_modules(args.lora_modules)
    if args.engine == "vllm":
        command, env = vllm_command(
            model_args.base_model, modules, template, listen.host, listen.port, args.served_model_name,
            args.max_loras, api_key_of(args), os.environ.get("TOT_CUDA"), model_args.precision,
        )  # fmt: skip
    else:
        if not args.gguf or not Path(args.gguf).is_file():
            raise UserError(f"--engine llamacpp needs --gguf FILE (a GGUF made by tools/convert_to_gguf.py); got {args.gguf!r}")
        if modules:
            raise UserError("--engine llamacpp serves one GGUF: merge the LoRA first (merge_lora.py, then tools/convert_to_gguf.py)")
        command, env = llamacpp_command(
            args.gguf, template, listen.host, listen.port, args.served_model_name, args.n_ctx, api_key_of(args)
        )
    print(" ".join(command), flush=True)  # the key travels in the environment, never on the command line
    if args.dry_run:
        return
    os.execvpe(command[0], command, {**os.environ, **env})  # replaced: signals reach the server itself


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, template_args, listen, args = parse_args((ModelArguments, TemplateArguments, ApiServerArguments, ServeArguments), argv)
    configure_logging()
    if args.engine not in ("builtin", "vllm", "llamacpp"):
        raise UserError(f"--engine {args.engine!r}: use builtin, vllm or llamacpp")
    if not 0 <= listen.port <= 65535:
        raise UserError(f"--port {listen.port}: a port is a number from 0 to 65535")
    if args.engine != "builtin":
        # the base's template, and that of LoRAs saved without one
        hand_off(model_args, template_args.template_or_fallback, listen, args)
        return
    lora_root = lora_root_of(args)
    if model_args.lora_weights:
        raise UserError("serve.py serves LoRAs by name: use --lora_modules NAME=DIR instead of --lora_weights")

    if not torch.cuda.is_available():
        # decoding threads wait for each other every step: one busy with HTTP stalls them all
        torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 2) - 1))
    model, tokenizer = load_from_args(model_args)
    registry = AdapterRegistry(model, tokenizer, parse_lora_modules(args.lora_modules), template_args.template_or_fallback, args.max_loras)
    engine = BatchEngine(registry, tokenizer, args.max_batch_size, args.max_queue)
    limits = ServeLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_model_len=context_length(model.config) or 2048,
        max_request_bytes=args.max_request_bytes,
    )
    base_name = args.served_model_name or Path(model_args.base_model.rstrip("/")).name
    server = OpenAIServer(engine, base_name, limits, api_key_of(args), lora_root)
    if listen.host not in ("127.0.0.1", "localhost", "::1") and server._key is None:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model", listen.host)
    logger.info("models: %s", ", ".join([base_name, *registry.names()]))
    try:
        serve_app(create_app(server), listen.host, listen.port, on_stop=lambda: engine.close(timeout=ENGINE_STOP_SECONDS))
    finally:
        engine.close(timeout=ENGINE_STOP_SECONDS)  # a step still running ends with the process (a daemon thread)


if __name__ == "__main__":
    sys.exit(main())

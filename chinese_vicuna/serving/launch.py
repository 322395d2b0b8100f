"""Hand-off to the engines users outgrow to: vLLM's OpenAI server (GPU) and llama-cpp-python's
(a GGUF on the CPU), started with the same model names, template and key as serve.py.

The key never goes on a command line (visible to every user in `ps`): vLLM reads it from
`VLLM_API_KEY`, and our llama.cpp runner (`python -m chinese_vicuna.serving.llamacpp_server`)
from `CHINESE_VICUNA_API_KEY`.

Both servers render chats with a Jinja `chat_template`: `PromptTemplate.jinja(bos=True,
single_instruction=True)`, which renders the registry template with BOS in front, joined as each
server's tokenizer needs it (vLLM and llama.cpp tokenize a rendered chat without adding special
tokens). vLLM renders a LoRA whose folder carries its own `chat_template.jinja` and tokenizer
(what finetune.py writes) with that template.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.infer.engine import INSTRUCTION, adapter_template, model_template
from chinese_vicuna.model.loading import has_tokenizer, load_tokenizer
from chinese_vicuna.prompts import CHAT_TEMPLATE_FILE, PromptTemplate, after_bos_for

logger = logging.getLogger(__name__)

API_KEY_ENV = "CHINESE_VICUNA_API_KEY"


def write_chat_template(template: PromptTemplate, folder: Path | None = None, tokenizer: Any = None) -> Path:
    """The Jinja of `template` in a file (the servers take a path): BOS in the text, joined as
    `tokenizer` needs it (vLLM tokenizes a rendered chat with the HF tokenizer, adding no special
    tokens), and an instruction template answers one user message (`PromptTemplate.jinja`)."""
    folder = folder or Path(tempfile.mkdtemp(prefix="cv-serve-"))
    path = folder / f"{template.name}.jinja"
    atomic_write_text(path, template.jinja(bos=True, single_instruction=True, after_bos=after_bos_for(tokenizer)))
    return path


def local_tokenizer(model: str) -> Any:
    """The tokenizer of a local model folder (to see how it tokenizes after BOS), else None."""
    folder = Path(model)
    if not (folder.is_dir() and has_tokenizer(folder)):
        return None
    return load_tokenizer(model)


def tensor_parallel_size(tot_cuda: str | None) -> int:
    """`TOT_CUDA="0,1"` → 2 (the launchers' variable); unset → 1."""
    return max(1, len([d for d in (tot_cuda or "").split(",") if d.strip()]))


VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def vllm_command(
    base_model: str,
    lora_modules: dict[str, str],
    prompt_template: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_loras: int = 4,
    api_key: str | None = None,
    tot_cuda: str | None = None,
    precision: str = "auto",
    template_dir: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """`vllm serve BASE --enable-lora --lora-modules NAME=DIR ... --chat-template FILE ...` and
    the environment it needs (the key). vLLM has one chat template per server: the base's;
    a LoRA saved with another template is an error (serve it with the built-in engine)."""
    if not base_model:
        raise UserError("--base_model is required")
    tokenizer = local_tokenizer(base_model)
    template = model_template(prompt_template, (), INSTRUCTION, tokenizer)
    carries: dict[str, bool] = {}  # LoRA folders with their own chat_template.jinja and tokenizer
    differ: list[str] = []  # LoRAs trained with another template than the server's
    for name, path in lora_modules.items():
        theirs = adapter_template(path, template, tokenizer)
        carries[name] = (Path(path) / CHAT_TEMPLATE_FILE).is_file() and has_tokenizer(Path(path))
        if theirs.spec != template.spec:
            if not carries[name]:
                raise UserError(
                    f"LoRA {name!r} was trained with the template {theirs.name!r} but vLLM renders every model with one chat template "
                    f"({template.name!r}) unless the LoRA folder carries its own {CHAT_TEMPLATE_FILE} and tokenizer files (folders "
                    "finetune.py writes do): serve them with the built-in engine, or one vLLM server per template"
                )
            differ.append(name)
    lacking = [name for name, has in carries.items() if not has]
    if differ and lacking:
        # vLLM takes a LoRA's template from the tokenizer in its folder only where no --chat-template is given
        raise UserError(
            f"LoRA {differ[0]!r} has its own chat template ({CHAT_TEMPLATE_FILE}) and LoRA {lacking[0]!r} has none: vLLM can render "
            "one of the two ways per server; serve them with the built-in engine, or one vLLM server each"
        )
    own = bool(differ)  # each LoRA rendered with its own template: no server-wide one
    if own:
        logger.warning(
            "LoRAs carry their own %s (%s): vLLM renders each with it (from the tokenizer in the LoRA folder); requests to the "
            "base model name use the base tokenizer's own chat_template",
            CHAT_TEMPLATE_FILE, ", ".join(map(repr, lora_modules)),
        )  # fmt: skip
    for name in lacking:
        logger.warning(
            "LoRA %r carries no %s (an adapter from elsewhere): vLLM renders its chats with the server's template %r",
            name, CHAT_TEMPLATE_FILE, template.name,
        )  # fmt: skip
    command = [shutil.which("vllm") or "vllm", "serve", base_model, "--host", host, "--port", str(port)]
    command += ["--served-model-name", served_model_name or Path(base_model.rstrip("/")).name]
    if not (template.is_auto or own):  # auto: vLLM renders with the tokenizer's own chat_template
        command += ["--chat-template", str(write_chat_template(template, template_dir, tokenizer))]
    command += ["--tensor-parallel-size", str(tensor_parallel_size(tot_cuda))]
    if precision in VLLM_DTYPES:
        command += ["--dtype", VLLM_DTYPES[precision]]
    if lora_modules:
        command += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank(lora_modules))]
        command += ["--lora-modules", *(f"{n}={p}" for n, p in lora_modules.items())]
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    if tot_cuda:
        env["CUDA_VISIBLE_DEVICES"] = tot_cuda
    return command, env


def max_lora_rank(lora_modules: dict[str, str]) -> int:
    """The largest `r` among the adapters (vLLM sizes its LoRA buffers by it), at least 8."""
    ranks = [8]
    for path in lora_modules.values():
        cfg = Path(path) / "adapter_config.json"
        if cfg.is_file():
            ranks.append(int(json.loads(cfg.read_text(encoding="utf-8")).get("r", 8)))
    return max(ranks)


def llamacpp_command(
    gguf: str,
    prompt_template: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    n_ctx: int = 2048,
    api_key: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Our llama.cpp runner: llama-cpp-python's OpenAI app with the GGUF and our template."""
    command = [sys.executable, "-m", "chinese_vicuna.serving.llamacpp_server", "--gguf", gguf, "--host", host, "--port", str(port)]
    command += ["--prompt_template", prompt_template, "--n_ctx", str(n_ctx)]
    command += ["--served_model_name", served_model_name or Path(gguf).stem]
    return command, ({API_KEY_ENV: api_key} if api_key else {})

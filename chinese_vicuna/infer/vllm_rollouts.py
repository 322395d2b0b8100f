"""GRPO's rollouts from a vLLM server (`--rollout_engine vllm --vllm_server_url URL`).

The user runs the server with runtime LoRA loading on:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R

Once per optimizer step (`push_adapter`), the adapter being trained is saved (staged, then renamed
whole: vLLM never reads a half-written folder) to OUTPUT_DIR/rollout-adapter/NAME, loaded into the
server under a new NAME (`POST /v1/load_lora_adapter`, vLLM's documented runtime endpoint), and the
previous one unloaded (`POST /v1/unload_lora_adapter`) and its folder removed. A new name each step:
vLLM refuses to load a name twice and caches adapters by name.

`sample_groups` asks `/v1/completions` once per prompt (concurrently, so the server batches them)
with the prompt as TOKEN IDS (the ids `Engine` builds, exactly generate.py's), `n` = the group,
temperature / top_p / top_k, `max_tokens`, a `seed` drawn from the run's RNG (or `generator`), and
`return_token_ids` (vLLM 0.10.2+), which gives each completion's ids. No stop strings are sent:
as the built-in sampler, a completion ends at the server's EOS or at `max_tokens`.

The rule (the same as `infer/rollouts.py sample_groups`): a completion's ids include the EOS when
it was generated (vLLM's `token_ids` keep it; only the text drops it); it is truncated when it
ended at `max_tokens` without an EOS as its last id (vLLM says `finish_reason` "length" even when
the token at the limit is the EOS, as its length check comes first: that completion is not
truncated here, as it is not in the built-in sampler).

Errors (no server, runtime LoRA loading off, an HTTP error) end in one line naming the URL and the fix.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.endpoint import openai_client
from chinese_vicuna.errors import UserError
from chinese_vicuna.files import follow_umask
from chinese_vicuna.infer.rollouts import Rollouts, _check

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "rollout-adapter"
SERVE_COMMAND = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank R"
MAX_CONCURRENT_REQUESTS = 64


def server_root(url: str) -> str:
    """http://host:8000, http://host:8000/ and http://host:8000/v1 → http://host:8000."""
    url = url.strip().rstrip("/")
    return url.removesuffix("/v1")


def completion_rollouts(choices: Sequence[Any], group: int, eos_ids: Sequence[int], max_tokens: int, where: str) -> Rollouts:
    """One prompt's `group` completions from a /v1/completions response's `choices` (each with
    `index`, `token_ids`, `finish_reason`), in index order, under the module's rule."""
    if len(choices) != group:
        raise UserError(f"{where}: the server returned {len(choices)} completions for n={group}; is it a vLLM server?")
    completions, truncated = [], []
    for choice in sorted(choices, key=lambda c: _field(c, "index")):
        ids = _field(choice, "token_ids")
        if ids is None:
            raise UserError(f"{where}: the server returned no token ids; vLLM 0.10.2 or later is needed (it has `return_token_ids`)")
        ids = [int(i) for i in ids]
        ended = bool(ids) and ids[-1] in eos_ids
        truncated.append(_field(choice, "finish_reason") == "length" and not ended)
        if len(ids) > max_tokens:
            raise UserError(f"{where}: the server returned {len(ids)} tokens for max_tokens={max_tokens}")
        completions.append(ids)
    return Rollouts(completions, truncated)


def _field(choice: Any, name: str) -> Any:
    """A field of a choice, a dict or the openai client's object (vLLM's extra fields included)."""
    return choice.get(name) if isinstance(choice, dict) else getattr(choice, name, None)


def server_error(url: str, action: str, exc: Exception) -> UserError:
    """The one line for a failed request to the server at `url`: what failed and the fix."""
    import openai

    where = f"--vllm_server_url {url}"
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        return UserError(f"{where}: no server answers ({action}: {exc}); start it: {SERVE_COMMAND} (docs/rl.md)")
    if isinstance(exc, openai.APIStatusError):
        status, message = exc.status_code, _server_message(exc)
        if status == 404 and "lora_adapter" in action:
            return UserError(
                f"{where}: {action} answered 404: runtime LoRA updating is off; restart the server with "
                f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora ({SERVE_COMMAND})"
            )
        hint = " (is the server started with --enable-lora, and --max-lora-rank at least the adapter's --lora_r?)"
        return UserError(f"{where}: {action} failed with HTTP {status}: {message}{hint if 'load_lora' in action else ''}")
    return UserError(f"{where}: {action} failed: {exc}")


def check_server(server_url: str, max_retries: int = 2) -> list[str]:
    """The models the server serves (`GET /v1/models`): before the model loads, a missing server
    ends the run in seconds, in one line."""
    import openai

    url = server_root(server_url)
    try:
        served = [m.id for m in openai_client(url + "/v1", max_retries=max_retries, timeout=30).models.list()]
    except openai.OpenAIError as exc:
        raise server_error(url, "GET /v1/models", exc) from None
    logger.info("rollouts: vLLM server %s serves %s", url, ", ".join(served))
    return served


class VllmServerRollouts:
    """`sample_groups` (as `Engine.sample_groups`) answered by a vLLM server, with the adapter of
    `engine.model` pushed to it by `push_adapter(step)` (module docstring)."""

    def __init__(self, engine: Any, server_url: str, output_dir: str | os.PathLike, *, max_retries: int = 2, timeout: float = 600.0) -> None:  # fmt: skip
        from transformers.integrations import is_deepspeed_zero3_enabled

        self.url = server_root(server_url)
        if is_deepspeed_zero3_enabled():  # each rank holds a shard: the adapter saved each step would be empty
            raise UserError(f"--vllm_server_url {self.url}: vLLM rollouts do not work under DeepSpeed ZeRO-3; use ZeRO-2 or no DeepSpeed")
        self.engine = engine
        self.client = openai_client(self.url + "/v1", max_retries=max_retries, timeout=timeout)
        self.folder = Path(output_dir).resolve() / ADAPTER_FOLDER
        self.run_tag = uuid.uuid4().hex[:8]  # names of this run's adapters: no clash with another run on the server
        rank = int(os.environ.get("RANK", "0"))
        self.prefix = f"cv-grpo-{self.run_tag}" + (f"-rank{rank}" if rank else "")
        self.loaded: str | None = None  # the adapter name the server holds for us
        self.pushed_step: int | None = None
        tokenizer = engine.tokenizer
        eos = tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)

    # --- the adapter, once per step ---------------------------------------------------------------
    def push_adapter(self, step: int) -> None:
        """Save the adapter as it is now and load it into the server, unless already done at `step`."""
        if step == self.pushed_step:
            return
        name = f"{self.prefix}-step{step}"
        path = self._save_adapter(name)
        try:
            self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, "POST /v1/load_lora_adapter")
        except UserError:
            shutil.rmtree(path, ignore_errors=True)
            raise
        previous, self.loaded, self.pushed_step = self.loaded, name, step
        if previous is not None:
            self._unload(previous)
        logger.info("rollouts: adapter of step %d loaded into %s as %s", step, self.url, name)

    def close(self) -> None:
        """Unload this run's adapter from the server and remove its folder."""
        if self.loaded is not None:
            self._unload(self.loaded)
            self.loaded, self.pushed_step = None, None
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def _unload(self, name: str) -> None:
        self._post("/unload_lora_adapter", {"lora_name": name}, "POST /v1/unload_lora_adapter")
        shutil.rmtree(self.folder / name, ignore_errors=True)

    def _save_adapter(self, name: str) -> Path:
        """The trained adapter (not the frozen reference) written to a staging folder, then renamed whole."""
        model = getattr(self.engine.model, "module", self.engine.model)
        adapter = getattr(model, "active_adapter", "default")
        final, staged = self.folder / name, self.folder / f".{name}.staging"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        model.save_pretrained(str(staged), selected_adapters=[adapter])
        saved = staged if adapter == "default" else staged / adapter  # PEFT puts other adapters in a subfolder
        follow_umask(saved)  # safetensors writes 0600: a server running as another user could not read it
        os.replace(saved, final)
        shutil.rmtree(staged, ignore_errors=True)
        return final

    def _post(self, path: str, body: dict[str, Any], action: str) -> None:
        import httpx
        import openai

        try:
            self.client.post(path, body=body, cast_to=httpx.Response)
        except openai.OpenAIError as exc:
            raise server_error(self.url, action, exc) from None

    # --- the rollouts ------------------------------------------------------------------------------
    def sample_groups(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[Sequence[dict[str, str]]],
        num_generations: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> Rollouts:
        """`num_generations` completions of each prompt from the server, with the adapter last
        pushed (pushed now, as step 0, when none was). `texts` as `Engine.sample_groups` fills them."""
        import openai

        engine = self.engine
        ids = [engine.prompt_ids(p) if p and isinstance(p[0], dict) else [int(t) for t in p] for p in prompts]
        _check(ids, num_generations, max_new_tokens, temperature, top_p, top_k)
        if self.loaded is None:
            self.push_adapter(0)
        # one seed per request from the run's RNG: reproducible with --seed, restored on resume
        device = generator.device if generator is not None else None
        seeds = torch.randint(0, 2**31 - 1, (len(ids),), generator=generator, device=device).tolist()
        request = {
            "model": self.loaded, "n": num_generations, "max_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "extra_body": {"top_k": top_k if top_k > 0 else -1, "return_token_ids": True},
        }  # fmt: skip

        def one(i: int) -> Rollouts:
            try:
                response = self.client.completions.create(prompt=ids[i], seed=seeds[i], **request)
            except openai.OpenAIError as exc:
                raise server_error(self.url, "POST /v1/completions", exc) from None
            where = f"--vllm_server_url {self.url}: POST /v1/completions"
            return completion_rollouts(response.choices, num_generations, self.eos_ids, max_new_tokens, where)

        with ThreadPoolExecutor(max_workers=min(len(ids), MAX_CONCURRENT_REQUESTS)) as pool:
            groups = list(pool.map(one, range(len(ids))))
        rollouts = Rollouts([c for g in groups for c in g.completion_ids], [t for g in groups for t in g.truncated])
        rollouts.texts = engine.completion_texts(rollouts.completion_ids)
        return rollouts


def _server_message(exc: Any) -> str:
    """The server's own words from an HTTP error (vLLM: {"error": {"message"}}, {"message"} or plain text)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"]).strip().splitlines()[0]
    text = getattr(getattr(exc, "response", None), "text", "") or str(exc)
    return text.strip().splitlines()[0] if text.strip() else f"HTTP {getattr(exc, 'status_code', '?')}"

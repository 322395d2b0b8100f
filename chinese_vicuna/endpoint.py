"""The OpenAI-compatible client, built in one place (evaluation, data generation, tests of the server).

Retries are the official client's own: 408/409/429 and 5xx are retried with exponential backoff
(honouring `retry-after` / `retry-after-ms`), `max_retries` times. A key comes from a flag or the
environment, is handed to the client only, and is never logged or written anywhere.
"""

from __future__ import annotations

import os
from typing import Any

from chinese_vicuna.errors import UserError

KEY_ENV_VARS = ("OPENAI_API_KEY",)
NO_KEY = "EMPTY"  # local servers (vLLM, llama.cpp, serve.py) accept any key


def resolve_api_key(flag_value: str | None, env_vars: tuple[str, ...] = KEY_ENV_VARS) -> str:
    """The key from the flag, else the first set environment variable, else a placeholder."""
    if flag_value:
        return flag_value
    for name in env_vars:
        if os.environ.get(name):
            return os.environ[name]
    return NO_KEY


def openai_client(api_base: str, api_key: str | None = None, max_retries: int = 5, timeout: float = 120.0) -> Any:
    """An `openai.OpenAI` client for `api_base` (e.g. http://127.0.0.1:8000/v1)."""
    if not api_base or not api_base.startswith(("http://", "https://")):
        raise UserError(f"API base {api_base!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
    try:
        import openai
    except ImportError:
        raise UserError("the `openai` package is missing: pip install openai (it is in requirements.txt)") from None
    return openai.OpenAI(base_url=api_base, api_key=api_key or NO_KEY, max_retries=max_retries, timeout=timeout)


def chat_completion(client: Any, model: str, messages: list[dict[str, str]], temperature: float = 0.0, max_tokens: int = 2048) -> str:
    """The text of one chat completion (temperature 0 by default: judges and references are greedy)."""
    response = client.chat.completions.create(model=model, messages=messages, temperature=temperature, max_tokens=max_tokens, n=1)
    return response.choices[0].message.content or ""

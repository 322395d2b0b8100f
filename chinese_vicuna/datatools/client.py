"""The one place an OpenAI-compatible client is built (self_instruct; the evaluation tools later).

Keys come from the `--api_key` flag or the `OPENAI_API_KEY` environment variable only; they are
handed to the client and never logged or written anywhere.
"""

from __future__ import annotations

import os
from typing import Any

# A local endpoint (serve.py, vLLM, llama.cpp) often needs no key, but the client insists on one.
NO_KEY = "none"


def openai_client(api_base: str, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 0) -> Any:
    """An `openai.OpenAI` client for `api_base` (e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1).

    `max_retries` defaults to 0: callers that rate-limit retry themselves, so that every attempt
    passes through their limiter (the client's own retries would not).
    """
    from openai import OpenAI

    key = api_key or os.environ.get("OPENAI_API_KEY") or NO_KEY
    return OpenAI(base_url=api_base, api_key=key, timeout=timeout, max_retries=max_retries)

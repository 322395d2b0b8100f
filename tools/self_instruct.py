"""Generate alpaca instruction data through any OpenAI-compatible endpoint (ChatGPT, DeepSeek, Qwen,
a local serve.py, vLLM, llama.cpp), parsed, validated and de-duplicated; resumable.

    python tools/self_instruct.py --api_base https://api.deepseek.com/v1 --model deepseek-chat \\
        --num_samples 1000 --output_file data/generated.jsonl --requests_per_minute 20 \\
        [--seed_tasks sample/instruct/data_sample.jsonl] [--concurrency 4]

The key comes from --api_key or OPENAI_API_KEY and is never logged. Rerun the same command after
an interruption: every line already written is kept and generation continues to --num_samples.
See docs/data.md.
"""

from __future__ import annotations

import logging

from chinese_vicuna.args import parse_args
from chinese_vicuna.datatools.selfinstruct import SelfInstructConfig, generate
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.logs import configure_logging


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (config,) = parse_args((SelfInstructConfig,), argv)
    configure_logging()
    # The HTTP client logs every request URL at INFO; keep the log to our own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = generate(config)
    print(f"{config.output_file}: {result.already_there + result.kept} records ({result.kept} new); {result.counts}")


if __name__ == "__main__":
    main()

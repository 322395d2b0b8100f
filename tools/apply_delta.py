"""Rebuild a model from delta weights: base + delta (tools/make_delta.py's output).

    python tools/apply_delta.py --base_model BASE --delta_path DELTA --target_model OUT [--max_shard_size 5GB]

Streams one tensor at a time. Every base tensor is checked against the SHA-256 the delta was
made with (a wrong base is one clear error), and every result against the target's SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chinese_vicuna.args import BaseModelArguments, parse_args
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.export.delta import apply_delta
from chinese_vicuna.export.tensors import parse_size
from chinese_vicuna.logs import configure_logging


@dataclass
class ApplyDeltaArguments:
    delta_path: str = field(metadata={"help": "tools/make_delta.py output."})
    target_model: str = field(metadata={"help": "Output folder for the rebuilt model."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard, e.g. 5GB or 500MB."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    base, args = parse_args((BaseModelArguments, ApplyDeltaArguments), argv)  # --base_model: the original base (HF folder, safetensors)
    configure_logging(plain=True)
    apply_delta(base.require_base_model("the original base (HF folder, safetensors)"), args.delta_path, args.target_model, parse_size(args.max_shard_size))
    print(f"wrote {args.target_model}")


if __name__ == "__main__":
    main()

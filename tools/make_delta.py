"""Delta weights: target − base, so a fine-tune of a base you may not redistribute can be shared.

    python tools/make_delta.py --base_model BASE --target_model MERGED --delta_path DELTA [--max_shard_size 5GB]

Streams one tensor at a time (memory ≈ one shard). Differences are stored in a precision that
makes base + delta reproduce the target bit for bit; `delta_manifest.json` records the SHA-256
of every base and target tensor so tools/apply_delta.py can check both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chinese_vicuna.args import BaseModelArguments, parse_args
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.export.delta import make_delta
from chinese_vicuna.export.tensors import parse_size
from chinese_vicuna.logs import configure_logging


@dataclass
class MakeDeltaArguments:
    target_model: str = field(metadata={"help": "The fine-tuned / merged model (HF folder, safetensors)."})
    delta_path: str = field(metadata={"help": "Output folder."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard, e.g. 5GB or 500MB."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    base, args = parse_args((BaseModelArguments, MakeDeltaArguments), argv)  # --base_model: the original base (HF folder, safetensors)
    configure_logging(plain=True)
    make_delta(base.require_base_model("the original base (HF folder, safetensors)"), args.target_model, args.delta_path, parse_size(args.max_shard_size))
    print(f"wrote {args.delta_path}")


if __name__ == "__main__":
    main()

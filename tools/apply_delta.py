"""Rebuild a model from delta weights: base + delta (tools/make_delta.py's output).

    python tools/apply_delta.py --base_model BASE --delta_path DELTA --target_model OUT [--max_shard_size 5GB]

Streams one tensor at a time. Every base tensor is checked against the SHA-256 the delta was
made with (a wrong base is one clear error), and every result against the target's SHA-256.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.export import apply_delta, parse_size


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="the original base (HF folder, safetensors)")
    p.add_argument("--delta_path", required=True, help="tools/make_delta.py output")
    p.add_argument("--target_model", required=True, help="output folder for the rebuilt model")
    p.add_argument("--max_shard_size", default="5GB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_delta(args.base_model, args.delta_path, args.target_model, parse_size(args.max_shard_size))
    print(f"wrote {args.target_model}")


if __name__ == "__main__":
    main()

"""Delta weights: target − base, so a fine-tune of a base you may not redistribute can be shared.

    python tools/make_delta.py --base_model BASE --target_model MERGED --delta_path DELTA [--max_shard_size 5GB]

Streams one tensor at a time (memory ≈ one shard). Differences are stored in a precision that
makes base + delta reproduce the target bit for bit; `delta_manifest.json` records the SHA-256
of every base and target tensor so tools/apply_delta.py can check both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.export import make_delta, parse_size


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="the original base (HF folder, safetensors)")
    p.add_argument("--target_model", required=True, help="the fine-tuned / merged model (HF folder, safetensors)")
    p.add_argument("--delta_path", required=True, help="output folder")
    p.add_argument("--max_shard_size", default="5GB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_delta(args.base_model, args.target_model, args.delta_path, parse_size(args.max_shard_size))
    print(f"wrote {args.delta_path}")


if __name__ == "__main__":
    main()

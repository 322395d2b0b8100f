"""Meta's LLaMA checkpoint (consolidated.NN.pth + params.json + tokenizer.model) → a Hugging Face
folder (safetensors shards, config.json, generation_config.json, tokenizer).

    python tools/convert_meta_to_hf.py --input_dir llama/7B --output_dir llama-7b-hf
    python tools/convert_meta_to_hf.py --input_dir llama/13B --output_dir llama-13b-hf --tokenizer_model llama/tokenizer.model

The first step of Chinese-LLaMA-Alpaca and of the 65B recipes (transformers 5 no longer ships
convert_llama_weights_to_hf). 1 to 8 shards, params.json with or without n_kv_heads (GQA) and
ffn_dim_multiplier; shards are memory-mapped, so a tensor is read from every shard only when
its merged copy is written. When the folder has a checklist.chk (Meta's md5 list) or
--checksums names a list (md5 or SHA-256, `HEX  FILE` per line), every file listed is checked
before anything is converted. The template files beside the `.pth` (`prompt_template.json`,
`chat_template.jinja`, as merge_lora.py --output_type pth writes them) go with it. The output is written in a staging folder and moved into place
when complete, with a manifest.json of SHA-256 sums.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import parse_args
from chinese_vicuna.devices import DTYPES
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.export.meta import hf_config_from_params, iter_meta_as_hf, load_meta
from chinese_vicuna.export.tensors import DTYPE_NAMES, ShardWriter, StagingDir, parse_size, write_manifest
from chinese_vicuna.files import write_json
from chinese_vicuna.prompts import carry_template_files

logger = logging.getLogger(__name__)


@dataclass
class ConvertMetaArguments:
    input_dir: str = field(metadata={"help": "Meta checkpoint folder: consolidated.NN.pth + params.json (e.g. llama/7B)."})
    output_dir: str = field(metadata={"help": "The Hugging Face folder to write."})
    tokenizer_model: str | None = field(
        default=None, metadata={"help": "tokenizer.model (default: in --input_dir, else its parent folder, as Meta ships it)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Output dtype: auto (the checkpoint's), fp16, bf16, fp32."})
    max_position_embeddings: int = field(default=2048, metadata={"help": "Context length: 2048 for LLaMA-1, 4096 for Llama-2."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard (e.g. 2GB, 500MB)."})
    checksums: str | None = field(
        default=None, metadata={"help": "md5 / SHA-256 list to check first (default: --input_dir/checklist.chk when present)."}
    )
    verify_checksums: bool = field(default=True, metadata={"help": "Check the files against the checksum list (when there is one)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace weights already in --output_dir."})


def verify_checksums(folder: Path, listing: Path) -> int:
    """Every file of a `HEX  NAME` list (md5: 32 hex digits, SHA-256: 64) must exist and match."""
    checked = 0
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32}|[0-9a-fA-F]{64})\s+\*?(.+)", line.strip())
        if not m:
            raise UserError(f"{listing}:{number}: not a checksum line (expected 'HEX  FILE')")
        want, name = m.group(1).lower(), m.group(2).strip()
        path = folder / name
        if not path.is_file():
            raise UserError(f"{listing}: lists {name}, which is not in {folder}")
        digest = hashlib.md5(usedforsecurity=False) if len(want) == 32 else hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != want:
            raise UserError(
                f"{path}: checksum {digest.hexdigest()} differs from {want} in {listing}: the download is damaged; fetch it again"
            )
        checked += 1
    return checked


def find_tokenizer(input_dir: Path, given: str | None) -> Path:
    candidates = [Path(given)] if given else [input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"no tokenizer.model at {' or '.join(map(str, candidates))}; pass --tokenizer_model PATH")


def convert_meta(args: ConvertMetaArguments) -> Path:
    input_dir = Path(args.input_dir)
    listing = Path(args.checksums) if args.checksums else input_dir / "checklist.chk"
    if args.checksums and not listing.is_file():
        raise UserError(f"--checksums {listing}: file not found")
    if args.verify_checksums and listing.is_file():
        logger.info("checked %d file(s) against %s", verify_checksums(input_dir, listing), listing)
    shards, params = load_meta(input_dir, mmap=True)
    tokenizer_model = find_tokenizer(input_dir, args.tokenizer_model)
    logger.info("%d shard(s), params %s", len(shards), params)
    embed = shards[0]["tok_embeddings.weight"]
    stored = embed.dtype
    dtype = stored if args.dtype == "auto" else DTYPES.get(args.dtype)
    if dtype is None:
        raise UserError(f"--dtype {args.dtype!r}: use auto, {', '.join(DTYPES)}")
    vocab = int(params.get("vocab_size") or -1)
    rows = int(shards[0]["output.weight"].shape[0]) if len(shards) == 1 else sum(int(s["output.weight"].shape[0]) for s in shards)
    if vocab > 0 and vocab != rows:
        raise UserError(f"{input_dir}/params.json: vocab_size {vocab} but output.weight has {rows} rows")
    with StagingDir(args.output_dir, args.overwrite) as stage:
        writer = ShardWriter(stage.path, parse_size(args.max_shard_size))
        for name, tensor in iter_meta_as_hf(shards, params):
            writer.add(name, tensor.to(dtype))
        files = writer.finish()
        write_json(stage.path / "config.json", hf_config_from_params(params, rows, args.max_position_embeddings, DTYPE_NAMES[dtype]))
        write_json(stage.path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
        shutil.copyfile(tokenizer_model, stage.path / "tokenizer.model")
        from transformers import LlamaTokenizer

        tokenizer = LlamaTokenizer.from_pretrained(str(stage.path), add_bos_token=True, add_eos_token=False)
        if len(tokenizer) > rows:
            raise UserError(
                f"{tokenizer_model}: {len(tokenizer)} tokens but the checkpoint has {rows} embedding rows: another model's tokenizer"
            )
        tokenizer.save_pretrained(str(stage.path))
        carried = carry_template_files(input_dir, stage.path, tokenizer)  # what merge_lora.py --output_type pth wrote there
        if carried:
            logger.info("template carried over: %s", carried)
        write_manifest(stage.path, {"converted_from": str(input_dir), "shards_in": len(shards), "files_out": [f.name for f in files]})
    logger.info("wrote %s (%d safetensors file(s), %s)", args.output_dir, len(files), DTYPE_NAMES[dtype])
    return Path(args.output_dir)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((ConvertMetaArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert_meta(args)


if __name__ == "__main__":
    main()

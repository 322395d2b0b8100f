"""Merge one or more LoRAs into the base model → HF safetensors or Meta's consolidated.NN.pth.

    python merge_lora.py --base_model BASE --lora_weights PRETRAIN_LORA,SFT_LORA --output_dir merged \
        [--output_type hf|pth] [--max_shard_size 5GB] [--dtype auto|fp32|fp16|bf16] [--verify] [--low_mem]

Adapters are applied in the order given (a vocabulary-resizing pretraining LoRA first). All
sizes are checked before any weight is loaded; the tokenizer of the last adapter that has one
is written; `manifest.json` lists the SHA-256 of every file written.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chinese_vicuna.args import parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.export.merge import (
    adapter_fingerprint,
    config_for_output,
    copy_tokenizer,
    max_diff,
    merge_low_mem,
    merge_with_peft,
    plan_merge,
    prompt_logits,
    repeated_adapters,
    verify_ids,
    write_template,
)
from chinese_vicuna.export.meta import save_meta
from chinese_vicuna.export.tensors import DTYPE_NAMES, StagingDir, parse_size, resolve_dtype, split_list, write_manifest
from chinese_vicuna.files import write_json
from chinese_vicuna.infer.engine import model_template
from chinese_vicuna.model.loading import load_tokenizer

logger = logging.getLogger("merge_lora")


@dataclass
class MergeArguments:
    base_model: str = field(metadata={"help": "Base model folder (Hugging Face format, safetensors)."})
    lora_weights: str = field(metadata={"help": "Adapter folder(s), comma-separated, applied in this order."})
    output_dir: str = field(metadata={"help": "Where the merged model goes (written in a staging folder, moved into place when complete)."})
    output_type: str = field(default="hf", metadata={"help": "hf: safetensors shards; pth: Meta's consolidated.NN.pth layout."})
    max_shard_size: str = field(default="5GB", metadata={"help": "hf output: largest safetensors shard (e.g. 2GB, 500MB)."})
    dtype: str = field(default="auto", metadata={"help": "Output dtype: auto (the base's), fp32, fp16, bf16."})
    num_shards: int | None = field(default=None, metadata={"help": "pth output: model-parallel shards (default by size, as Meta)."})
    verify: bool = field(default=False, metadata={"help": "Compare merged logits with base + LoRAs; exit 1 above tolerance."})
    tolerance: float | None = field(default=None, metadata={"help": "--verify limit (default 1e-4 for fp32, 1 percent of the logit range else)."})
    low_mem: bool = field(default=False, metadata={"help": "Stream the base one shard at a time (peak ≈ one shard + adapters)."})
    lora_config: str | None = field(
        default=None,
        metadata={"help": "adapter_config.json for an adapter folder that has none (a Chinese-Vicuna checkpoint-N: pytorch_model.bin)."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Template written into the merged model (prompt_template.json + Jinja chat_template). Default: the one "
            "saved with the last adapter (or the base); none written when there is none."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace the model in --output_dir (the new one is swapped in by renames once complete)."},
    )
    allow_repeated_lora: bool = field(
        default=False,
        metadata={"help": "Merge a LoRA that is named twice or already merged into --base_model (its effect is added again)."},
    )

    def __post_init__(self) -> None:
        if self.output_type not in ("hf", "pth"):
            raise UserError(f"--output_type {self.output_type!r}: use hf or pth")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise UserError(f"--dtype {self.dtype!r}: use auto, fp32, fp16 or bf16")


def verify_written(plan, tokenizer, reference_model, out: Path, dtype: torch.dtype, tolerance: float | None) -> dict:
    """Logits of the files on disk vs base + LoRAs (PEFT, fp32) on a few prompts."""
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = verify_ids(tokenizer, plan.final_vocab)
    ref = prompt_logits(reference_model, ids)
    diff = max_diff(prompt_logits(written, ids), ref)
    if tolerance is None:
        scale = max(float(r.abs().max()) for r in ref)
        tolerance = 1e-4 if dtype == torch.float32 else 0.01 * scale
    print(f"verify: written model vs base + LoRAs: max abs logit diff {diff:.3g} (tolerance {tolerance:.3g})", flush=True)
    return {"max_abs_diff_written_vs_reference": diff, "tolerance": tolerance, "ok": diff <= tolerance}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((MergeArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.low_mem and args.output_type != "hf":
        raise UserError("--low_mem writes --output_type hf only (Meta's shards split every layer); drop one of them")
    start = time.time()

    # 1. every size checked from file headers, before any weight is loaded
    plan = plan_merge(args.base_model, split_list(args.lora_weights), args.lora_config)
    for note in plan.notes:
        logger.info(note)
    repeats = repeated_adapters(plan)
    if repeats and not args.allow_repeated_lora:
        raise UserError(
            f"--lora_weights: {repeats[0]}: this LoRA would be merged twice (its delta added again); "
            "drop it, or pass --allow_repeated_lora true if that is meant"
        )
    for repeat in repeats:
        logger.warning("merging a LoRA again (--allow_repeated_lora): %s", repeat)
    dtype = resolve_dtype(args.dtype, plan.config)
    max_shard = parse_size(args.max_shard_size)
    tokenizer = load_tokenizer(str(plan.tokenizer_dir))
    info = {
        "base_model": str(plan.base),
        "lora_weights": [str(a.path) for a in plan.adapters],
        # adapters by content, so a later merge into this model can tell one that is already in it
        "lora_sha256": [adapter_fingerprint(a) for a in plan.adapters],
        "tokenizer_from": str(plan.tokenizer_dir),
        "output_type": args.output_type,
        "dtype": DTYPE_NAMES[dtype],
        "vocab_size": plan.final_vocab,
    }
    with StagingDir(args.output_dir, args.overwrite) as stage:  # moved into place only when complete
        # 2. merge: PEFT's merge_and_unload, or W + scale·B·A streamed shard by shard
        model, reference, steps = None, None, []
        if args.low_mem:
            merge_low_mem(plan, stage.path, dtype, max_shard)
            write_json(stage.path / "config.json", config_for_output(plan, dtype))
            gen = plan.base / "generation_config.json"
            if gen.is_file():
                (stage.path / "generation_config.json").write_bytes(gen.read_bytes())
            if args.verify:
                reference, steps = merge_with_peft(plan, tokenizer, verify=True)
        else:
            model, steps = merge_with_peft(plan, tokenizer, verify=args.verify)
            if args.verify:
                reference = model
            if args.output_type == "hf":
                # keep the fp32 model intact as the --verify reference when casting
                model_out = copy.deepcopy(model) if args.verify and dtype != torch.float32 else model
                model_out.to(dtype).save_pretrained(str(stage.path), max_shard_size=max_shard, safe_serialization=True)
            else:
                state = {k: v.to(dtype) for k, v in model.state_dict().items()}
                config = {**model.config.to_dict(), "vocab_size": plan.final_vocab}
                shards = save_meta(state, config, stage.path, args.num_shards)
                logger.info("wrote %d consolidated shard(s) + params.json", len(shards))
        copy_tokenizer(plan, stage.path)
        # the template inference would ask in, with no default: nothing saved, nothing written
        template = model_template(args.prompt_template, [*(a.path for a in reversed(plan.adapters)), plan.base], None, tokenizer)
        if template is not None and not template.is_auto:
            write_template(stage.path, template)
            info["prompt_template"] = template.name
        elif template is None:
            logger.info(
                "no prompt template saved with the adapters or base: the merged model gets no chat_template (--prompt_template sets one)"
            )

        # 3. verify what was written (hf), then the manifest, then move into place
        result = {"steps": steps}
        if args.verify and args.output_type == "hf":
            result.update(verify_written(plan, tokenizer, reference, stage.path, dtype, args.tolerance))
        elif args.verify:
            worst = max(s["max_abs_diff_merged_vs_unmerged"] for s in steps)
            tol = args.tolerance if args.tolerance is not None else 1e-4
            result.update({"max_abs_diff_merged_vs_unmerged": worst, "tolerance": tol, "ok": worst <= tol})
        if args.verify:
            info["verify"] = result
        write_manifest(stage.path, info)
    logger.info("wrote %s (%s, %s) in %.1f s", args.output_dir, args.output_type, DTYPE_NAMES[dtype], time.time() - start)
    if args.verify and not info["verify"]["ok"]:
        print(f"error: verification failed: merged logits differ from base + LoRAs by more than {info['verify']['tolerance']:.3g}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()

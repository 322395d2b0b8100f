"""Run set-up: what a script calls, in view, right after parsing its flags.

- `configure_logging` (chinese_vicuna/logs.py): the one logging set-up of every script and tool.
- `prepare_run` (the training recipes): logging, the seed, the checkpoint to resume from
  (checked against the run's fingerprint) and the output folder (`prepare_output_dir`, the one
  place a fresh run claims its folder). Parsing (`args.parse_args`) does none of this.
- `load_from_args`: the inference scripts' model flags → `model.build.load_for_inference`'s values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from chinese_vicuna import checkpoints
from chinese_vicuna.args import ModelArguments
from chinese_vicuna.devices import cpu_has_native_bf16, is_main_process
from chinese_vicuna.errors import UserError
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.outputlock import hold_output_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSetup:
    """What `prepare_run` decided: the checkpoint to resume from (None: a fresh run) and the run's fingerprint."""

    resume_from_checkpoint: str | None
    fingerprint: dict[str, Any]


def prepare_run(parsed: Sequence[Any], identity: checkpoints.RunIdentity) -> RunSetup:
    """The set-up step of a training recipe, before anything loads: logging (the main process at
    INFO, others at WARNING), the seed, the run's fingerprint from the flags `identity` names, the
    checkpoint to resume from, and the output folder (`prepare_output_dir`)."""
    train = next(a for a in parsed if isinstance(a, TrainingArguments))
    model = next((a for a in parsed if isinstance(a, ModelArguments)), None)
    configure_logging(logging.INFO if train.should_log else logging.WARNING)
    if model is not None:
        model.require_base_model()
    log_derived_settings(train)
    # Seed now: the LoRA is initialised before the Trainer exists (which seeds only in its
    # __init__), so without this two runs with the same --seed start apart.
    from transformers import set_seed

    set_seed(train.seed)
    fingerprint = checkpoints.run_fingerprint(parsed, identity)
    checkpoints.check_writable(train.output_dir)
    if is_main_process():
        # one writer per folder, before anything reads it for a resume or moves a run aside
        hold_output_folder(train.output_dir)
    resume = resolve_resume(train, fingerprint, identity.data_choice)
    prepare_output_dir(train, resume)
    return RunSetup(resume, fingerprint)


def log_derived_settings(train: TrainingArguments) -> None:
    """What parsing decided on its own, said once logging is on."""
    if getattr(train, "packing", True) is False and train.group_by_length:
        logger.info("packing off: length-grouped batches (--group_by_length false to draw them uniformly at random)")
    if train.use_cpu and not train.bf16 and cpu_has_native_bf16():
        # Opt-in, not a default: results would then differ between CPUs with and without it.
        logger.info("this CPU has native bf16 matmuls: --bf16 true trains faster here (docs/benchmarks.md)")


def resolve_resume(args: TrainingArguments, fingerprint: dict[str, Any] | None = None, data_choice: Sequence[str] = ()) -> str | None:
    """`--resume_from_checkpoint true|last`: the newest complete checkpoint-N of output_dir (incomplete
    ones, from an interrupted save of an older version or a damaged disk, are named and passed over);
    a named checkpoint must be complete. Either way it must belong to this run (`fingerprint`)."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "0", "none"):
        return None
    if args.overwrite_output_dir:
        raise UserError("--overwrite_output_dir true starts over and --resume_from_checkpoint continues: pass only one")
    needs_optimizer = not args.save_only_model
    if str(value).lower() in ("true", "yes", "1", "last", "latest"):
        folder, skipped = checkpoints.newest_complete_checkpoint(args.output_dir, needs_optimizer)
        for reason in skipped:
            logger.warning("not resuming from %s", reason)
        if folder is None:
            found = f" (incomplete: {'; '.join(skipped)})" if skipped else ""
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {args.output_dir}{found}")
        how = "the newest complete checkpoint"
    else:
        folder = Path(value)
        if not folder.is_dir():
            raise UserError(f"--resume_from_checkpoint {value}: folder not found")
        problem = checkpoints.checkpoint_problem(folder, needs_optimizer)
        if problem:
            raise UserError(
                f"--resume_from_checkpoint {value}: {problem}; name another checkpoint-N, or pass true for the newest complete one"
            )
        how = "as named"
    if fingerprint is not None:
        checkpoints.check_fingerprint(folder, fingerprint, data_choice, new_data=args.ignore_data_skip)
    logger.info("resuming from %s (%s in %s)", folder, how, args.output_dir)
    return str(folder)


def prepare_output_dir(args: TrainingArguments, resume_from_checkpoint: str | None) -> None:
    """Before anything loads: output_dir is a writable folder, and a fresh run does not write over
    (nor mix its log and checkpoints with) another run's unless --overwrite_output_dir true, which
    moves the previous run aside. The one place a run claims its output folder."""
    checkpoints.check_writable(args.output_dir)
    if resume_from_checkpoint or not checkpoints.holds_a_run(args.output_dir):
        return
    if not args.overwrite_output_dir:
        found = [p.name for p in checkpoints.checkpoint_folders(args.output_dir)] or ["a saved adapter"]
        raise UserError(
            f"--output_dir {args.output_dir} holds another run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): "
            "continue it with --resume_from_checkpoint true, start over with --overwrite_output_dir true, or choose another --output_dir"
        )
    if is_main_process():
        moved = checkpoints.move_previous_run_aside(args.output_dir)
        logger.warning("--overwrite_output_dir true: the previous run's checkpoints and adapter were moved to %s", moved)


def load_from_args(model_args: ModelArguments) -> tuple[Any, Any]:
    """`model.build.load_for_inference` with the values of the scripts' model flags (precision decided while parsing)."""
    from chinese_vicuna.model.build import load_for_inference
    from chinese_vicuna.model.rope import resolve_rope

    return load_for_inference(
        model_args.base_model,
        model_args.lora_weights,
        model_args.precision,
        model_args.device_map,
        model_args.tokenizer_path,
        model_args.trust_remote_code,
        model_args.attn_implementation,
        model_args.lora_config,
        resolve_rope(model_args.rope_scaling, model_args.rope_factor, model_args.model_max_length, model_args.lora_weights),
    )

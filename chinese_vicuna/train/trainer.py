"""Trainer assembly shared by the training recipes: logs (trainer_log.jsonl, loss plot), the
Trainer itself, and training + saving a loadable adapter (ZeRO-3 safe).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments

from chinese_vicuna.checkpoints import WEIGHT_FILES
from chinese_vicuna.devices import is_main_process, world_size
from chinese_vicuna.errors import TrainingInterrupted, UserError, disk_full_as_os_error
from chinese_vicuna.files import atomic_write_text, follow_umask, save_figure
from chinese_vicuna.model.loading import trainable_parameters
from chinese_vicuna.prompts import PromptTemplate, save_template_files
from chinese_vicuna.train.checkpointing import with_atomic_checkpoints, write_fingerprint
from chinese_vicuna.train.lora_variants import with_lora_variants

logger = logging.getLogger(__name__)


class JsonlLogCallback(TrainerCallback):
    """Appends every log entry to `trainer_log.jsonl`; writes `training_loss.png` at the end.

    At the start the log is cut back to the step training starts from (0 for a fresh run, the
    checkpoint's step on resume), so it tells the one history of the adapter, never `1…6, 1…4`."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "trainer_log.jsonl"

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").split("\n")
        kept = [line + "\n" for line in lines if _logged_step(line) is not None and _logged_step(line) <= state.global_step]
        if len(kept) != len([line for line in lines if line]):
            atomic_write_text(self.path, "".join(kept))

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            plot_loss(state.log_history, self.path.parent / "training_loss.png")


def _logged_step(line: str) -> int | None:
    """The step of one trainer_log.jsonl line; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line).get("step", 0)) if line.strip() else None
    except ValueError:
        return None


def plot_loss(log_history: list[dict[str, Any]], out_png: str | os.PathLike) -> bool:
    """Training (and eval) loss against steps, as a PNG. False when there is nothing to plot."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out_png)
    return True


def log_trainable(model: Any) -> None:
    trainable, total = trainable_parameters(model)
    logger.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1)
    )


def build_trainer(
    trainer_class: type[Trainer],
    model: Any,
    tokenizer: Any,
    args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    data_collator: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """An instance of `trainer_class` (the stage's Trainer) with the stage's own keyword arguments
    `trainer_kwargs` (e.g. a preference stage's reference model and beta), logging to
    trainer_log.jsonl. Every checkpoint is a loadable adapter saved atomically: a class without
    `AtomicCheckpointMixin` is subclassed with it (`with_atomic_checkpoints`), one that has it
    is used as it is.

    A `train_dataset` without a length (a stream: data/pretrain.py StreamingBlocks) needs --max_steps."""
    if not hasattr(train_dataset, "__len__"):
        if args.max_steps <= 0:
            raise UserError("streamed training data has no length: pass --max_steps (optimizer steps to train)")
        logger.info(
            "streamed training data, %d eval samples; global batch %d; %d optimizer steps",
            len(eval_dataset or []),
            args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size(),
            args.max_steps,
        )
        return _make_trainer(trainer_class, model, tokenizer, args, train_dataset, eval_dataset, data_collator, callbacks, trainer_kwargs)
    if len(train_dataset) == 0:
        raise UserError("no training samples left; check the data file and --cutoff_len")
    steps_per_epoch = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * world_size() * args.gradient_accumulation_steps))
    total = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    if args.get_warmup_steps(total) > total:
        logger.warning(
            "warm-up (%d steps) is longer than the whole run (%d optimizer steps): the learning rate never reaches "
            "--learning_rate %g; lower --warmup_steps (e.g. %d)",
            args.get_warmup_steps(total), total, args.learning_rate, max(total // 10, 1),
        )  # fmt: skip
    logger.info(
        "%d training samples, %d eval; global batch %d = %d × %d accumulation × %d processes; %d optimizer steps per epoch",
        len(train_dataset),
        len(eval_dataset or []),
        args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size(),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        world_size(),
        steps_per_epoch,
    )
    return _make_trainer(trainer_class, model, tokenizer, args, train_dataset, eval_dataset, data_collator, callbacks, trainer_kwargs)


def _make_trainer(
    trainer_class: type[Trainer],
    model: Any,
    tokenizer: Any,
    args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Any,
    callbacks: list[TrainerCallback] | None,
    trainer_kwargs: dict[str, Any],
) -> Trainer:
    return with_lora_variants(with_atomic_checkpoints(trainer_class))(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset or None,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(args.output_dir), *(callbacks or [])],
        **trainer_kwargs,
    )


def train_and_save(
    trainer: Trainer,
    tokenizer: Any,
    template: PromptTemplate | None = None,
    resume_from_checkpoint: str | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> None:
    """Train (or resume) and save the final adapter through the Trainer (ZeRO-3 safe), with its
    tokenizer, the template it was trained with (`prompt_template.json` and `chat_template.jinja`,
    also in every checkpoint with the tokenizer files, so that `AutoTokenizer` + `PeftModel` on the
    folder ask the model as generate.py does: pitfall 17) and the run fingerprint (`run.prepare_run`;
    also in every checkpoint). Ctrl-C ends in one line that says how to resume."""
    args = trainer.args
    if is_main_process():
        log_trainable(trainer.model)
        write_fingerprint(args.output_dir, fingerprint)
    if fingerprint is not None:
        trainer.add_checkpoint_writer(lambda folder: write_fingerprint(folder, fingerprint))
    if template is not None:
        # every checkpoint-N is an adapter folder a stock tool can use: the template both ways
        trainer.add_checkpoint_writer(lambda folder: save_template_files(folder, template, tokenizer))
    try:
        with ctrl_c_at_step_end(trainer):
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except KeyboardInterrupt:
        raise TrainingInterrupted(interrupted_message(trainer, resume_from_checkpoint)) from None
    # Trainer.save_model gathers ZeRO-3 shards and calls PEFT's save_pretrained on the
    # unwrapped (uncompiled) model: adapter_config.json + adapter_model.safetensors.
    with disk_full_as_os_error(args.output_dir):
        trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        follow_umask(*(Path(args.output_dir) / name for name in WEIGHT_FILES if (Path(args.output_dir) / name).is_file()))
        tokenizer.save_pretrained(args.output_dir)
        if template is not None:
            save_template_files(args.output_dir, template, tokenizer)
        logger.info("adapter saved to %s", args.output_dir)


class CtrlCAtStepEnd(TrainerCallback):
    """Raises KeyboardInterrupt at the next step boundary once Ctrl-C was pressed. Python drops a
    KeyboardInterrupt raised inside a destructor ("Exception ignored in ..."), and datasets'
    `Dataset.__del__` runs during training: without this, such a Ctrl-C is lost and training goes on."""

    def __init__(self) -> None:
        self.pressed = False

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.pressed = True
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt where Python is now

    def on_substep_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    on_step_end = on_substep_end


@contextlib.contextmanager
def ctrl_c_at_step_end(trainer: Trainer) -> Iterator[CtrlCAtStepEnd | None]:
    """During training, Ctrl-C also stops at the next step if its first KeyboardInterrupt was
    dropped (see CtrlCAtStepEnd). Only where Python's own SIGINT handler is installed (main thread)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield None
        return
    callback = CtrlCAtStepEnd()
    trainer.add_callback(callback)
    signal.signal(signal.SIGINT, callback.on_sigint)
    try:
        yield callback
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        trainer.remove_callback(callback)


def interrupted_message(trainer: Trainer, resumed_from: str | None) -> str:
    """What Ctrl-C in training leaves: the step reached and the checkpoint a resume starts from."""
    last = getattr(trainer, "last_checkpoint", None) or resumed_from
    step = trainer.state.global_step
    if last is None:
        return (
            f"interrupted at step {step}, before the first checkpoint (every --save_steps {trainer.args.save_steps:g} steps): "
            "nothing to resume; run again"
        )
    return f"interrupted at step {step}; {last} is complete: resume with --resume_from_checkpoint true"


"""Atomic checkpoints: every `checkpoint-N` is written whole into a staging folder, then renamed.

Trainer writes a checkpoint file by file (adapter, optimizer, scheduler, RNG, trainer state);
killed in between, it left a `checkpoint-N` that `--resume_from_checkpoint true` picked and
crashed on, or resumed from with fresh optimizer state. Here `_save_checkpoint` writes into
`OUTPUT_DIR/.checkpoint-staging/checkpoint-N` (with what the recipe adds through
`add_checkpoint_writer`: the run fingerprint, `prompt_template.json`), flushes it to disk, and
renames it to `OUTPUT_DIR/checkpoint-N`: a reader, a resume or a crash sees the whole checkpoint or none of it. Rotation
(`--save_total_limit`) runs after the rename, so it only ever deletes complete checkpoints
older than the new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from chinese_vicuna.checkpoints import FINGERPRINT_NAME, STAGING_DIR
from chinese_vicuna.errors import disk_full_as_os_error
from chinese_vicuna.files import atomic_write_text, follow_umask
from chinese_vicuna.train.losses import ChunkedLossMixin

logger = logging.getLogger(__name__)


def write_fingerprint(folder: str | os.PathLike, fingerprint: dict[str, Any] | None) -> None:
    if fingerprint is not None:
        atomic_write_text(Path(folder) / FINGERPRINT_NAME, json.dumps(fingerprint, indent=2, ensure_ascii=False) + "\n")


def _sync_tree(folder: Path, files: bool = True) -> None:
    """Flush the staged files and their folder to disk, so the rename publishes data that survives a power cut."""
    for path in [*(sorted(p for p in folder.rglob("*") if p.is_file()) if files else []), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointMixin:
    """Trainer mixin: checkpoints staged and renamed complete (module docstring). `checkpoint_writers`
    are called with each staged folder before it is published (files that belong in every checkpoint)."""

    checkpoint_writers: list[Callable[[Path], None]]
    # The newest published checkpoint of this run (for the message when training is interrupted).
    last_checkpoint: str | None = None

    def add_checkpoint_writer(self, writer: Callable[[Path], None]) -> None:
        self.__dict__.setdefault("checkpoint_writers", []).append(writer)

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)  # type: ignore[misc]
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if trial is not None:  # hyperparameter search writes per-trial folders of its own
            return super()._save_checkpoint(model, trial)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        run_dir = Path(args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        staging_root = run_dir / STAGING_DIR
        staged, final = staging_root / name, run_dir / name
        if args.should_save and staging_root.exists():
            shutil.rmtree(staging_root)  # left by a save that was killed: never published, never resumable
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        self._staging = True
        try:
            with disk_full_as_os_error(run_dir):  # the previous checkpoint stays whole: this one was only staged
                super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]  # every process wrote its part
        if args.should_save:
            for writer in getattr(self, "checkpoint_writers", []):
                writer(staged)
            follow_umask(staged)  # safetensors writes the adapter 0600
            _sync_tree(staged)
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replaced whole
                old = staging_root / f"{name}.replaced"
                os.replace(final, old)
                os.replace(staged, final)
                shutil.rmtree(old)
            else:
                os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            _sync_tree(run_dir, files=False)  # the rename itself
            rotate_checkpoints(run_dir, args.save_total_limit, self._published(self.state.best_model_checkpoint))  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        state.best_model_checkpoint = self._published(state.best_model_checkpoint)
        self.last_checkpoint = str(final)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]  # the others see the published folder

    def _published(self, path: str | None) -> str | None:
        """A staged path recorded by Trainer (best checkpoint) → where it lives once published."""
        if path is None:
            return None
        staged = Path(path)
        return str(staged.parent.parent / staged.name) if staged.parent.name == STAGING_DIR else path


class CheckpointTrainer(ChunkedLossMixin, AtomicCheckpointMixin, Trainer):
    """The stock Trainer with atomic checkpoints (padded batches, `--packing false`), its loss
    through lm_head in chunks (train/losses.py)."""


def with_atomic_checkpoints(trainer_class: type[Trainer]) -> type[Trainer]:
    """`trainer_class` itself when it already saves atomically, else a subclass that does."""
    if issubclass(trainer_class, AtomicCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (AtomicCheckpointMixin, trainer_class), {"__doc__": trainer_class.__doc__})

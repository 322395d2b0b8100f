"""Checkpoint folders and the run they belong to, decided before anything loads.

- A `checkpoint-N` is complete when its trainer state, weights, optimizer, scheduler and RNG
  files are all there and whole (checked by size and format headers, nothing is loaded).
  Checkpoints are written to a staging folder and renamed complete (`train/checkpointing.py`),
  so an interrupted save leaves no `checkpoint-N`; folders of older writers may still be partial.
- The run fingerprint (`run_fingerprint.json` in the output folder and every checkpoint): the
  identity of the data, base model and template, and the settings a resumed run must share.
  Each recipe names its identifying flags (`RunIdentity`) next to its flag groups.
- The output folder: writable, not holding another run unless the user asks to start over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_DIR = ".checkpoint-staging"  # inside output_dir; Trainer's own lookups match only checkpoint-N
FINGERPRINT_NAME = "run_fingerprint.json"
TRAINER_STATE_NAME = "trainer_state.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# What a run writes into its output folder (moved aside together by --overwrite_output_dir true).
RUN_FILES = (
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", FINGERPRINT_NAME, "trainer_log.jsonl",
    "training_loss.png", "prompt_template.json", "perplexity.json", "training_args.bin", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "config.json",
    "generation_config.json", "model.safetensors", "model.safetensors.index.json", "runs", STAGING_DIR,
)  # fmt: skip

# Files above this size are identified by their size and sampled pieces, not read whole.
FULL_HASH_LIMIT = 1 << 30
SAMPLE_BYTES = 1 << 24


# ---------------------------------------------------------------- complete checkpoints


def checkpoint_step(folder: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0, reverse=True)


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory sits at the end: a cut file has none."""
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size == 0:
        return f"{path} is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"{path} is truncated or damaged (not a complete torch.save archive)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated ({size} bytes)"
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            return f"{path} is truncated ({size} bytes, shorter than its header)"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return f"{path} is damaged (its header is not valid JSON)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{path} is truncated ({size} of {expected} bytes)"
    return None


def checkpoint_problem(folder: str | os.PathLike, needs_optimizer: bool = True) -> str | None:
    """None when `folder` is a complete checkpoint, else one phrase naming the missing or damaged file.

    `needs_optimizer`: the optimizer, scheduler and RNG states are required (not with --save_only_model)."""
    folder = Path(folder)
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"{state} is missing (the save was interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"{state} is damaged (not a trainer state)"
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        return f"{folder / WEIGHT_FILES[0]} is missing (no adapter or model weights)"
    for path in sorted(folder.glob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return problem
    for path in weights:
        if path.suffix == ".bin" and (problem := _torch_file_problem(path)):
            return problem
    if not needs_optimizer:
        return None
    if any(folder.glob("global_step*")):  # DeepSpeed keeps the optimizer in its own folder
        return None
    for name in ("optimizer.pt", "scheduler.pt"):
        if problem := _torch_file_problem(folder / name):
            return problem
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return f"{folder / 'rng_state.pth'} is missing"
    for path in rng:
        if problem := _torch_file_problem(path):
            return problem
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike, needs_optimizer: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete `checkpoint-N` of `output_dir` (or None), and why each newer one was passed over."""
    skipped = []
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder, needs_optimizer)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped


# ---------------------------------------------------------------- run fingerprint


def _file_identity(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_LIMIT:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:  # a corpus of many GB: its size and three pieces tell it apart without reading it all
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return {"bytes": size, "sha256": h.hexdigest()}


def data_identity(value: str | None) -> list[dict[str, Any]] | None:
    """The content of each data file (a comma list of files or folders), independent of where it lies."""
    if not value:
        return None
    out: list[dict[str, Any]] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        path = Path(part)
        if path.is_file():
            out.append({"name": path.name, **_file_identity(path)})
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)):
                out.append({"name": file.relative_to(path).as_posix(), **_file_identity(file)})
        else:
            out.append({"name": part})
    return out


def folder_identity(value: str | None) -> str | None:
    """A model or adapter folder by its content (file names and sizes, small JSON files whole), so a
    moved or copied folder is the same model; a hub id stands for itself."""
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        return value
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        if file.suffix == ".json" and file.stat().st_size < (1 << 20):
            h.update(file.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """The flags that identify a run, named by its recipe: a resume must share them.

    `data`: flags naming data files or folders (compared by content, wherever they lie);
    `models`: flags naming model, tokenizer or adapter folders (by content; a hub id as itself);
    `settings`: compared as given (`prompt_template`: the template trained with, a .json by content);
    `data_choice`: those of the above that may change on resume with --ignore_data_skip true
    (the resumed run starts its data from the beginning: other data on purpose)."""

    data: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    data_choice: tuple[str, ...] = ()


def run_fingerprint(parsed: Sequence[Any], identity: RunIdentity) -> dict[str, Any]:
    """What identifies a run: the values of `identity`'s flags in the parsed argument groups, files
    and folders by their content."""
    values: dict[str, Any] = {}
    for args in parsed:
        for name in (*identity.settings, *identity.data, *identity.models):
            if hasattr(args, name) and name not in values:
                values[name] = getattr(args, name)
        if "prompt_template" in identity.settings and hasattr(args, "template_or_fallback"):
            values["prompt_template"] = args.template_or_fallback
    fingerprint: dict[str, Any] = {}
    for name, value in values.items():
        if name in identity.data:
            fingerprint[name] = data_identity(value)
        elif name in identity.models:
            fingerprint[name] = folder_identity(value)
        elif name == "prompt_template" and isinstance(value, str) and value.endswith(".json") and Path(value).is_file():
            fingerprint[name] = {"file": Path(value).name, **_file_identity(Path(value))}
        else:
            fingerprint[name] = value
    return fingerprint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields that differ, each as `name` or `name old → new` where the values are short."""
    out = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old == new:
            continue
        short = all(v is None or isinstance(v, (str, int, float, bool)) for v in (old, new)) and len(f"{old}{new}") < 80
        out.append(f"{name} {old} → {new}" if short else f"{name} (other content)")
    return out


def check_fingerprint(checkpoint: Path, current: dict[str, Any], data_choice: Sequence[str] = (), new_data: bool = False) -> None:
    """A UserError when `checkpoint` was written by a run with other data, base, template or settings.

    `new_data` (--ignore_data_skip true: the resumed run starts its data from the beginning): other
    data is what the user means, so only the fields outside `data_choice` must agree."""
    saved_file = checkpoint / FINGERPRINT_NAME
    if not saved_file.is_file():
        logger.warning("%s has no %s (written by an older version): its data and settings cannot be checked", checkpoint, FINGERPRINT_NAME)
        return
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{saved_file} is damaged (not valid JSON); resume from another checkpoint-N") from None
    if new_data:
        saved = {k: v for k, v in saved.items() if k not in data_choice}
        current = {k: v for k, v in current.items() if k not in data_choice}
    differences = fingerprint_differences(saved, current)
    if differences:
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: it belongs to a run with other data or settings ({'; '.join(differences)}); "
            "resume with that run's flags (other data on purpose: add --ignore_data_skip true), or start over with "
            "--overwrite_output_dir true (or another --output_dir)"
        )


# ---------------------------------------------------------------- the output folder


def check_writable(output_dir: str | os.PathLike, flag: str = "--output_dir") -> None:
    """`output_dir` is (or can be created as) a folder this process can write; nothing is created."""
    path = Path(output_dir).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise UserError(f"{flag} {output_dir}: {existing} is a file, not a folder; choose another {flag}")
    if existing == path and not path.is_dir():
        raise UserError(f"{flag} {output_dir}: is a file, not a folder; choose another {flag}")
    probe = existing / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {output_dir}: cannot write in {existing} ({exc.strerror}); choose a writable {flag}") from None


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """`path` can be written as a file: not a folder, and no file where one of its folders should be."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    folder = target.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder; choose another {flag}")


def previous_run_entries(output_dir: str | os.PathLike) -> list[Path]:
    """What a finished or interrupted run left in `output_dir` that a fresh run would overwrite or mix with."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if checkpoint_step(p) is not None or p.name in RUN_FILES)


def holds_a_run(output_dir: str | os.PathLike) -> bool:
    """Checkpoints or a saved adapter: a run whose work a fresh run would destroy."""
    root = Path(output_dir)
    return bool(checkpoint_folders(root)) or any((root / name).is_file() for name in WEIGHT_FILES[:3])


def move_previous_run_aside(output_dir: str | os.PathLike) -> Path | None:
    """--overwrite_output_dir true: the previous run's files go to `superseded-<UTC time>/` inside
    `output_dir` (not deleted: hours of checkpoints are one typo away). Returns that folder."""
    entries = previous_run_entries(output_dir)
    if not entries:
        return None
    stamp = time.strftime("superseded-%Y%m%d-%H%M%S", time.gmtime())
    target, n = Path(output_dir) / stamp, 1
    while target.exists():
        n += 1
        target = Path(output_dir) / f"{stamp}-{n}"
    target.mkdir()
    for entry in entries:
        shutil.move(str(entry), str(target / entry.name))
    return target

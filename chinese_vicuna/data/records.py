"""Reading data files: alpaca records, folders of data files, plain text lines; every problem
is a UserError naming the file and the line or record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError


@dataclass
class Record:
    """One record of a data file and where it came from (for error messages)."""

    data: Any
    where: str  # "data.jsonl:12" or "data.json record 3"


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records of a `.json` file (a list) or a `.jsonl` file (one JSON value per line).

    Every problem ends in a UserError naming the file and the line or record.
    """
    return list(iter_records(path))


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """`read_records`, one record at a time: a `.jsonl` file is read line by line, so its size
    does not bound memory; a `.json` file (one list) is parsed whole."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
        return
    if path.suffix != ".json":
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; use .json (a list of records) or .jsonl")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8 (at byte {exc.start}); save the file as UTF-8") from None
    del raw
    if not text.strip():
        raise UserError(f"{path}: the file is empty; it needs at least one record")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, list):
        raise UserError(f"{path}: a .json data file must hold a list of records, got {type(value).__name__}; or use .jsonl")
    if not value:
        raise UserError(f"{path}: the list of records is empty")
    for i, v in enumerate(value):
        yield Record(v, f"{path} record {i + 1}")


def _iter_jsonl(path: Path) -> Iterator[Record]:
    count = 0
    offset = 0  # bytes before the current line, for the error message
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                where = offset + exc.start
                raise UserError(f"{path}:{lineno}: bytes that are not UTF-8 (at byte {where}); save the file as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield Record(json.loads(line), f"{path}:{lineno}")
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            count += 1
    if not count:
        raise UserError(f"{path}: the file is empty; it needs at least one record")


def validate_instruction(record: Record, require_output: bool = True) -> dict[str, str]:
    """An alpaca record: `instruction` and `output` strings, optional `input` string.

    `require_output=False` (questions to answer, generate.py's batch mode): `output` may be absent.
    """
    rec = record.data
    required = ("instruction", "output") if require_output else ("instruction",)
    if not isinstance(rec, dict):
        raise UserError(f"{record.where}: expected a JSON object with {' and '.join(map(repr, required))}, got {type(rec).__name__}")
    for key in required:
        if key not in rec:
            raise UserError(f"{record.where}: missing field {key!r} (an alpaca record needs {' and '.join(map(repr, required))})")
    for key in ("instruction", "input", "output"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise UserError(f"{record.where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec["instruction"].strip():
        raise UserError(f"{record.where}: field 'instruction' is empty")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec.get("output") or ""}


def data_files(data_path: str | os.PathLike, suffixes: tuple[str, ...] = (".json", ".jsonl"), flag: str = "--data_path") -> list[Path]:
    """A data file, or every file with one of `suffixes` in a folder (sorted; hidden files skipped)."""
    path = Path(data_path)
    kinds = " or ".join(suffixes)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes and p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"{flag} {path}: the folder has no {kinds} files")
        return files
    if not path.exists():
        raise UserError(f"{flag} {path}: {'file' if path.suffix else 'folder'} not found")
    return [path]


def read_text_lines(files: Iterable[str | os.PathLike]) -> list[str]:
    """Non-empty lines of UTF-8 text files; a missing or non-UTF-8 file is a UserError."""
    return list(iter_text_lines(files))


def iter_text_lines(files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """`read_text_lines`, one line at a time (a corpus larger than memory is fine)."""
    for path in map(Path, files):
        if not path.is_file():
            raise UserError(f"{path}: text file not found")
        offset = 0
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{path}: not UTF-8 text (byte {offset + exc.start}); save it as UTF-8") from None
                offset += len(raw)
                for part in line.splitlines():  # str.splitlines also splits at \u2028, \x1c...: as before
                    if part.strip():
                        yield part

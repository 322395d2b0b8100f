"""Batch inference files: one output line per input record, resumable after a kill.

Lines are appended one `write` each and flushed, so a killed run leaves whole lines (at
most a torn last one, which is cut off on restart). A restart counts the lines already
written, checks they belong to the same inputs, and carries on after them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from chinese_vicuna.data.records import Record, validate_instruction
from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)


def check_output_file(output_file: str | os.PathLike, data_file: str | os.PathLike) -> None:
    """The output file may be written: not the data file itself, not a folder (checked before the model loads)."""
    out, data = Path(output_file), Path(data_file)
    if out.resolve() == data.resolve() or (out.exists() and data.exists() and os.path.samefile(out, data)):
        raise UserError(f"--output_file {out} is the --data_file; answers go to another file (e.g. {data.stem}.answers.jsonl)")
    if out.is_dir():
        raise UserError(f"--output_file {out}: is a folder; give a file name")
    if out.exists() and not out.is_file():
        raise UserError(f"--output_file {out}: is not a regular file; give a file name")


def resume_point(output_file: str | os.PathLike, records: list[Record]) -> int:
    """How many records `output_file` already answers (0 if it does not exist).

    A torn last line (a run killed mid-write) is removed. Lines that do not match the
    inputs in order mean the file belongs to other data: a UserError, nothing overwritten.
    Lines end at b"\\n" only: U+2028, U+2029 and U+0085 inside a JSON string (written as they
    are with ensure_ascii=False) are not line ends, as `str.splitlines` would take them.
    """
    path = Path(output_file)
    if not path.exists():
        return 0
    if not path.is_file():
        raise UserError(f"--output_file {path}: is not a regular file; give a file name")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"--output_file {path}: cannot read it ({exc.strerror or exc}); check its permissions") from None
    complete = raw[: raw.rfind(b"\n") + 1]
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"--output_file {path}: not UTF-8 JSON lines (byte {exc.start}), not an answers file; delete it or use another --output_file"
        ) from None
    if len(complete) != len(raw):
        logger.warning("%s: removing a torn last line (an interrupted run)", path)
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    lines = text.split("\n")[:-1]  # the text ends with "\n" (or is empty)
    if len(lines) > len(records):
        raise UserError(f"{path}: has {len(lines)} lines but the data file has only {len(records)} records; use another --output_file")
    for i, line in enumerate(lines):
        try:
            done = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path}:{i + 1}: not a JSON line; delete the file or use another --output_file") from None
        if not isinstance(done, dict) or (done.get("instruction"), done.get("input") or "") != question_of(records[i]):
            raise UserError(
                f"{path}:{i + 1}: does not answer {records[i].where} (another data file?); delete it or use another --output_file"
            )
    return len(lines)


class JsonlAppender:
    """Append JSON lines, each in one write and flushed (a kill leaves whole lines)."""

    def __init__(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115 (closed in close())

    def write(self, value: Any) -> None:
        data = (json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # unbuffered: loop over short writes
            view = view[self.file.write(view) :]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def question_of(record: Record) -> tuple[str, str]:
    """(instruction, input) of an alpaca record to answer; its `output`, if any, is replaced."""
    rec = validate_instruction(record, require_output=False)
    return rec["instruction"], rec["input"]

"""Reading data files: alpaca records, folders of data files, plain text lines; every problem
is a UserError naming the file and the line or record.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Record:
    """One record of a data file and where it came from (for error messages)."""

    data: Any
    where: str  # "data.jsonl:12" or "data.json record 3"


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors of the operating system while reading `path` as one line naming it."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions") from None


def check_readable(path: Path, what: str) -> None:
    """`path` is a regular file this process may open: else a UserError saying what it is instead."""
    try:
        st = path.stat()
    except FileNotFoundError:
        broken = " (a symlink to nothing)" if path.is_symlink() else ""
        raise UserError(f"{path}: {what} not found{broken}") from None
    except OSError as exc:  # a symlink loop (ELOOP), a name too long...
        raise UserError(f"{path}: cannot open ({exc.strerror or exc}); fix or remove it") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a folder, not a {what}; rename it or give a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: is not a regular file; give a {what}")
    with _reading(path), path.open("rb"):
        pass


def parse_json(text: str, where: str | os.PathLike, first_line: int | None = None) -> Any:
    """`json.loads`, every failure a UserError naming `where` (and the line): invalid JSON, an
    integer too long for Python's int-string limit (a ValueError), nesting deeper than the
    recursion limit (a RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line if first_line is not None else exc.lineno
        raise UserError(f"{_at(where, line)}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:
        raise UserError(f"{_at(where, first_line)}: a value JSON allows but Python cannot read ({exc}); fix the record") from None
    except RecursionError:
        raise UserError(f"{_at(where, first_line)}: JSON nested too deeply to read; fix the record") from None


def _at(where: str | os.PathLike, line: int | None) -> str:
    where = str(where)
    return f"{where}:{line}" if line is not None and not where.endswith(f":{line}") else where


# A lone surrogate can only come from a "\udXXX" escape (UTF-8 text cannot hold one).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def may_hold_surrogates(raw: str) -> bool:
    """Whether JSON text has a surrogate escape: only then can a parsed value hold a lone one."""
    return "\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None


def check_text(value: Any, where: str) -> None:
    """No lone surrogate (`"\\ud800"`, which no tokenizer or file can encode) in a parsed record."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
        raise UserError(f"{where}: a lone surrogate ({bad}) in a string, not a character; fix the record") from None
    except (ValueError, RecursionError):
        pass  # parse_json already read it; nothing more to find here


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records of a `.json` file (a list) or a `.jsonl` file (one JSON value per line).

    Every problem ends in a UserError naming the file and the line or record.
    """
    return list(iter_records(path))


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """`read_records`, one record at a time: a `.jsonl` file line by line, a `.json` list element by
    element (`_iter_json_list`), so a file's size does not bound memory."""
    path = Path(path)
    check_readable(path, "data file")
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
        return
    if path.suffix != ".json":
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; use .json (a list of records) or .jsonl")
    yield from _iter_json_list(path)


READ_BLOCK = 1 << 20  # bytes read at a time from a .json list
_WHITESPACE = " \t\n\r"


class _ListReader:
    """The text of a .json file, read a block at a time, with the line number of what is kept."""

    def __init__(self, path: Path, f: Any) -> None:
        self.path, self.f = path, f
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.line, self.bytes_read, self.eof = "", 0, 1, 0, False
        self.column = 0  # characters of the window's first line that were dropped

    def more(self) -> bool:
        """Read on (at least as much as is held: a long record costs no quadratic re-parsing); False at the end."""
        if self.eof:
            return False
        if self.pos > len(self.text) // 2:  # drop what was consumed
            self.line += self.text.count("\n", 0, self.pos)
            newline = self.text.rfind("\n", 0, self.pos)
            self.column = self.column + self.pos if newline < 0 else self.pos - newline - 1
            self.text, self.pos = self.text[self.pos :], 0
        block = self.f.read(max(READ_BLOCK, len(self.text) - self.pos))
        try:
            self.text += self.utf8.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            at = self.bytes_read - len(self.utf8.getstate()[0]) + exc.start
            raise UserError(
                f"{self.path}:{_line_at(self.path, at)}: bytes that are not UTF-8 (at byte {at}); save the file as UTF-8"
            ) from None
        self.bytes_read += len(block)
        self.eof = not block
        return True

    def skip_space(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos : self.pos + 1]

    def invalid(self, exc: json.JSONDecodeError) -> UserError:
        column = exc.colno + (self.column if exc.lineno == 1 else 0)
        return UserError(f"{self.path}:{self.line + exc.lineno - 1}: invalid JSON ({exc.msg} at column {column})")


def _line_at(path: Path, offset: int) -> int:
    line = 1
    with path.open("rb") as f:
        while offset > 0 and (block := f.read(min(READ_BLOCK, offset))):
            line += block.count(b"\n")
            offset -= len(block)
    return line


def _iter_json_list(path: Path) -> Iterator[Record]:
    """The elements of a `.json` list, parsed one at a time from a window of the file (an incremental
    reader: `json.load` held the whole text and every parsed record at once, several times the file)."""
    decoder = json.JSONDecoder()
    count = 0
    with _reading(path), path.open("rb") as f:
        text = _ListReader(path, f)
        first = text.skip_space()
        if not first:
            raise UserError(f"{path}: the file is empty; it needs at least one record")
        if first != "[":  # not a list: read whole for the message (a small file, or a mistake)
            while text.more():
                pass
            value = parse_json(text.text, path)
            raise UserError(f"{path}: a .json data file must hold a list of records, got {type(value).__name__}; or use .jsonl")
        text.pos += 1
        if text.skip_space() == "]":
            raise UserError(f"{path}: the list of records is empty")
        while True:
            text.skip_space()
            start = text.pos
            try:
                value, end = decoder.raw_decode(text.text, start)
                # a number cut at the window's end parses short ("1." as 1, "12" of "123")
                if not text.eof and (end >= len(text.text) or (type(value) in (int, float) and end + 32 >= len(text.text))):
                    raise json.JSONDecodeError("cut", text.text, len(text.text))
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(text.text) - 6 or exc.msg.startswith("Unterminated string")
                if cut and text.more():
                    continue
                raise text.invalid(exc) from None
            except ValueError as exc:
                raise UserError(
                    f"{path}:{text.line + text.text.count(chr(10), 0, start)}: a value JSON allows but Python cannot read ({exc}); fix the record"
                ) from None
            except RecursionError:
                raise UserError(
                    f"{path}:{text.line + text.text.count(chr(10), 0, start)}: JSON nested too deeply to read; fix the record"
                ) from None
            count += 1
            where = f"{path} record {count}"
            if may_hold_surrogates(text.text[start:end]):
                check_text(value, where)
            text.pos = end
            yield Record(value, where)
            after = text.skip_space()
            if after == ",":
                text.pos += 1
                continue
            if after == "]":
                text.pos += 1
                if text.skip_space():
                    raise text.invalid(json.JSONDecodeError("Extra data", text.text, text.pos))
                return
            message = "Expecting ',' delimiter" if after else "Unterminated list (the file ends inside it)"
            raise text.invalid(json.JSONDecodeError(message, text.text, text.pos))


def _iter_jsonl(path: Path) -> Iterator[Record]:
    count = 0
    offset = 0  # bytes before the current line, for the error message
    with _reading(path), path.open("rb") as f:
        # A binary file iterates at b"\n" only: U+2028, U+2029 and U+0085 inside a JSON string
        # (json.dumps(ensure_ascii=False) writes them as they are) stay in their line.
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                where = offset + exc.start
                raise UserError(f"{path}:{lineno}: bytes that are not UTF-8 (at byte {where}); save the file as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            value = parse_json(line, where, first_line=lineno)
            if may_hold_surrogates(line):
                check_text(value, where)
            yield Record(value, where)
            count += 1
    if not count:
        raise UserError(f"{path}: the file is empty; it needs at least one record")


def validate_instruction(record: Record, require_output: bool = True) -> dict[str, str]:
    """An alpaca record: `instruction` and `output` strings, optional `input` string.

    `require_output=False` (questions to answer, generate.py's batch mode): `output` may be absent
    or null. A null `input` means no input; a null `instruction` or `output`, or an empty
    `output` to train on, is a UserError (consistent with chat data: an empty turn is an error).
    """
    rec = record.data
    required = ("instruction", "output") if require_output else ("instruction",)
    if not isinstance(rec, dict):
        raise UserError(f"{record.where}: expected a JSON object with {' and '.join(map(repr, required))}, got {type(rec).__name__}")
    for key in required:
        if key not in rec:
            raise UserError(f"{record.where}: missing field {key!r} (an alpaca record needs {' and '.join(map(repr, required))})")
    for key in ("instruction", "input", "output"):
        value = rec.get(key)
        if value is None and key in rec and key != "input":
            if key == "output" and not require_output:
                continue  # a question to answer: its output is what will be written
            raise UserError(f"{record.where}: field {key!r} is null; give it a string (or remove the record)")
        if value is not None and not isinstance(value, str):
            raise UserError(f"{record.where}: field {key!r} must be a string, got {type(value).__name__}")
    if not rec["instruction"].strip():
        raise UserError(f"{record.where}: field 'instruction' is empty")
    if require_output and not rec["output"].strip():
        # an empty answer would train nothing but EOS: the model would learn to say nothing
        raise UserError(f"{record.where}: field 'output' is empty; give the answer to train on (or remove the record)")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec.get("output") or ""}


def data_files(data_path: str | os.PathLike, suffixes: tuple[str, ...] = (".json", ".jsonl"), flag: str = "--data_path") -> list[Path]:
    """A data file, or every file with one of `suffixes` in a folder (sorted). In a folder, hidden
    files are skipped, other files are skipped and counted in the log, and an entry named like a
    data file that is not a readable file (a folder, a dangling or looping symlink) is a UserError."""
    path = Path(data_path)
    kinds = " or ".join(suffixes)
    if path.is_dir():
        files, hidden, other = [], [], []
        for p in sorted(path.iterdir()):
            if p.name.startswith("."):
                hidden.append(p.name)
            elif p.suffix in suffixes:
                check_readable(p, "data file")
                files.append(p)
            else:
                other.append(p.name)
        if hidden or other:
            logger.info(
                "%s %s: %d %s files read; skipped %d hidden and %d other entries%s",
                flag, path, len(files), kinds, len(hidden), len(other), f" ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''})" if other else "",
            )  # fmt: skip
        if not files:
            raise UserError(f"{flag} {path}: the folder has no {kinds} files")
        return files
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{flag} {path}: {'file' if path.suffix else 'folder'} not found")
    return [path]


def read_text_lines(files: Iterable[str | os.PathLike]) -> list[str]:
    """Non-empty lines of UTF-8 text files; a missing or non-UTF-8 file is a UserError."""
    return list(iter_text_lines(files))


def iter_text_lines(files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """`read_text_lines`, one line at a time (a corpus larger than memory is fine)."""
    for path in map(Path, files):
        check_readable(path, "text file")
        offset = 0
        with _reading(path), path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{path}: not UTF-8 text (byte {offset + exc.start}); save it as UTF-8") from None
                offset += len(raw)
                for part in line.splitlines():  # str.splitlines also splits at \u2028, \x1c...: as before
                    if part.strip():
                        yield part

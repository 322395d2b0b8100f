"""Reading data files: alpaca records, folders of data files, plain text lines; every problem
is a UserError naming the file and the line or record.

Records come from `.json` / `.jsonl` files and from the formats datasets are published in on the
Hugging Face hub: `.parquet` (read a record batch at a time), `.csv`, `.arrow` (memory-mapped),
a `datasets.save_to_disk` folder, a local clone of a hub dataset repository (its `train` split, as
`datasets` finds it: `data/train-*.parquet`, a README's `configs`...), and a hub id `user/name`
(read through `datasets.load_dataset`, so it is cached and works offline from the cache).
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
    """`read_records`, one record at a time: a `.jsonl` or `.csv` file is read line by line, a
    `.parquet` file a record batch at a time, an `.arrow` file memory-mapped and a `.json` list
    element by element (`_iter_json_list`), so their size does not bound memory. A folder or a hub
    id is every record of its data files (`data_files`)."""
    path = Path(path)
    if path.suffix not in DATA_SUFFIXES and not path.is_file():
        for file in data_files(path):
            yield from iter_records(file)
        return
    check_readable(path, "data file")
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
        return
    if path.suffix in TABLE_READERS:
        yield from _count_rows(path, TABLE_READERS[path.suffix](path))
        return
    if path.suffix != ".json":
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
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


# A record batch of a Parquet or Arrow file: rows converted to Python a batch at a time.
TABLE_BATCH_ROWS = 1024


def _count_rows(path: Path, records: Iterator[Record]) -> Iterator[Record]:
    count = 0
    for record in records:
        count += 1
        yield record
    if not count:
        raise UserError(f"{path}: the file has no rows; it needs at least one record")


def _table_rows(path: Path, batches: Iterable[Any]) -> Iterator[Record]:
    """Rows of Arrow record batches as dicts (a null as None, as in JSON), numbered from 1."""
    row = 0
    for batch in batches:
        for value in batch.to_pylist():
            row += 1
            yield Record(value, f"{path} row {row}")


def _iter_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # buffered reads, no pre-buffering of whole column chunks: memory is a record batch
        parquet = pq.ParquetFile(str(path), buffer_size=1 << 20, pre_buffer=False)
        yield from _table_rows(path, parquet.iter_batches(batch_size=TABLE_BATCH_ROWS))
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read it as Parquet ({str(exc).splitlines()[0]}); check the file") from None


def _iter_arrow(path: Path) -> Iterator[Record]:
    """An Arrow IPC stream (what `datasets` writes) or file (Feather v2), memory-mapped."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                batches: Iterable[Any] = reader
            except pa.ArrowInvalid:
                source.seek(0)
                file_reader = pa.ipc.open_file(source)
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            yield from _table_rows(path, batches)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read it as Arrow ({str(exc).splitlines()[0]}); check the file") from None


def _iter_csv(path: Path) -> Iterator[Record]:
    """Rows of a CSV file with a header line, every value a string (as typed: "42" stays text)."""
    import csv

    csv.field_size_limit(1 << 30)  # a long answer in one cell
    with _reading(path), path.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if extra:
                    raise UserError(f"{path}:{reader.line_num}: {len(extra)} more values than the header has columns; quote the cells")
                yield Record(row, f"{path}:{reader.line_num}")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path}: bytes that are not UTF-8 (after line {reader.line_num}, {exc.reason}); save the file as UTF-8"
            ) from None
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({exc}); check the quoting") from None


TABLE_READERS = {".parquet": _iter_parquet, ".arrow": _iter_arrow, ".csv": _iter_csv}
DATA_SUFFIXES = (".json", ".jsonl", *TABLE_READERS)


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


def data_files(data_path: str | os.PathLike, suffixes: tuple[str, ...] = DATA_SUFFIXES, flag: str = "--data_path") -> list[Path]:
    """A data file, or every file with one of `suffixes` in a folder (sorted). In a folder, hidden
    files are skipped, other files are skipped and counted in the log, and an entry named like a
    data file that is not a readable file (a folder, a dangling or looping symlink) is a UserError.

    Where `suffixes` are those of records (the default), also the hub's layouts: a
    `datasets.save_to_disk` folder (its Arrow files), a local clone of a hub dataset repository
    (its `train` split), and a hub id `user/name` that is not a local path (`hub_data_files`)."""
    path = Path(data_path)
    kinds = " or ".join(suffixes)
    records = set(suffixes) == set(DATA_SUFFIXES)
    if path.is_dir() and records:
        hub = hub_layout_files(path, flag)
        if hub is not None:
            return hub
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
            found = " or ".join(k for k in suffixes if any(f.suffix == k for f in files)) or kinds
            logger.info(
                "%s %s: %d %s files read; skipped %d hidden and %d other entries%s",
                flag, path, len(files), found, len(hidden), len(other), f" ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''})" if other else "",
            )  # fmt: skip
        if not files:
            raise UserError(f"{flag} {path}: the folder has no {kinds} files")
        return files
    if not path.exists() and not path.is_symlink():
        if records and HUB_ID.fullmatch(str(data_path)) and path.suffix not in DATA_SUFFIXES:
            return hub_data_files(str(data_path), flag)
        raise UserError(f"{flag} {path}: {'file' if path.suffix else 'folder'} not found")
    return [path]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SPLIT = "train"


def hub_layout_files(folder: Path, flag: str) -> list[Path] | None:
    """The files of a folder in one of the hub's layouts, or None for a plain folder of data files:
    a `save_to_disk` Dataset (`state.json`: its Arrow files in order) or DatasetDict
    (`dataset_dict.json`: the `train` split's folder); a hub dataset repository (a `.gitattributes`
    or README with YAML front matter, or data only in subfolders such as `data/`): the `train`
    split's files as `datasets` resolves them (`data/train-*.parquet`, `train/`, README `configs`)."""
    if (folder / "dataset_dict.json").is_file():
        splits = _json_file(folder / "dataset_dict.json").get("splits") or []
        if SPLIT not in splits:
            raise UserError(f"{flag} {folder}: a saved DatasetDict without a {SPLIT!r} split (it has {', '.join(map(str, splits))})")
        return hub_layout_files(folder / SPLIT, flag)
    if (folder / "state.json").is_file():
        names = [entry.get("filename") for entry in _json_file(folder / "state.json").get("_data_files") or []]
        if not names or not all(isinstance(n, str) for n in names):
            raise UserError(f"{folder}/state.json: no data files listed; not a complete datasets.save_to_disk folder")
        files = [folder / n for n in names]
        for f in files:
            check_readable(f, "data file")
        return files
    readme = folder / "README.md"
    is_repo = (folder / ".gitattributes").is_file() or (readme.is_file() and readme.read_bytes()[:4] in (b"---\n", b"---\r"))
    has_data_here = any(p.suffix in DATA_SUFFIXES and not p.name.startswith(".") for p in folder.iterdir())
    if not is_repo and has_data_here:
        return None
    if not is_repo and not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        return None
    return _split_files(str(folder), flag)


def hub_data_files(hub_id: str, flag: str) -> list[Path]:
    """The cached Arrow files of a hub dataset's `train` split: `datasets.load_dataset` downloads
    and converts it once, into its cache (HF_DATASETS_CACHE), and reads it from there offline."""
    try:
        import datasets

        dataset = datasets.load_dataset(hub_id, split=SPLIT)
    except Exception as exc:  # offline, an unknown id, no train split: one message for all
        raise UserError(
            f"{flag} {hub_id}: not a local file or folder, and not loadable as a hub dataset ({str(exc).splitlines()[0]}); "
            "offline, a hub dataset must be in the datasets cache from an earlier run with network"
        ) from None
    files = [Path(f["filename"]) for f in dataset.cache_files]
    if not files:
        raise UserError(
            f"{flag} {hub_id}: the dataset is held in memory, not in cache files; save it with save_to_disk and pass that folder"
        )
    logger.info("%s %s: the %r split from the datasets cache (%d Arrow files, %d rows)", flag, hub_id, SPLIT, len(files), len(dataset))
    return files


def _split_files(folder: str, flag: str) -> list[Path]:
    """The `train` split's data files of a local hub dataset repository, as `datasets` resolves them."""
    try:
        import datasets

        builder = datasets.load_dataset_builder(folder)
        splits = builder.config.data_files or {}
    except Exception as exc:  # datasets raises many kinds for a layout it cannot read
        raise UserError(f"{flag} {folder}: a dataset repository datasets cannot read ({str(exc).splitlines()[0]})") from None
    if SPLIT not in splits:
        raise UserError(f"{flag} {folder}: no {SPLIT!r} split (it has {', '.join(map(str, splits)) or 'none'}); give the data file itself")
    files = [Path(f) for f in splits[SPLIT]]
    unknown = [f for f in files if f.suffix not in DATA_SUFFIXES]
    if unknown:
        raise UserError(f"{unknown[0]}: unknown data file type {unknown[0].suffix!r}; use {', '.join(DATA_SUFFIXES)}")
    logger.info("%s %s: the %r split, %d files (%s)", flag, folder, SPLIT, len(files), ", ".join(f.name for f in files[:3]))
    return files


def _json_file(path: Path) -> dict[str, Any]:
    with _reading(path):
        value = parse_json(path.read_text(encoding="utf-8"), path)
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


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

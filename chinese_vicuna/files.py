"""Files: atomic writes (a reader, or a crash, never sees half a file) and JSON reads that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from chinese_vicuna.errors import UserError

_UMASK: int | None = None


def process_umask() -> int:
    """The process's umask, read once. Linux shows it in /proc/self/status; elsewhere it can only
    be read by setting it, which is done once here (at the first write, before worker threads
    write files) and never again, so no other thread creates a file under a zero umask later."""
    global _UMASK
    if _UMASK is None:
        try:
            status = Path("/proc/self/status").read_text(encoding="ascii")
            _UMASK = int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)  # type: ignore[union-attr]
        except (OSError, AttributeError, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def umask_mode(directory: bool = False) -> int:
    """The permissions `open()` / `mkdir()` would give a new file (0o666) or folder (0o777) under the umask."""
    return (0o777 if directory else 0o666) & ~process_umask()


def make_readable(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or folder made private by `tempfile.mkstemp` / `mkdtemp` (0600 / 0700) the
    permissions the umask asks for, so others can read a model as with any file the user writes."""
    os.chmod(path, umask_mode(directory))


def follow_umask(*paths: str | os.PathLike) -> None:
    """Files (every file under a folder) written by a library that makes them private get the umask's
    permissions: safetensors' `save_file` writes 0600, so PEFT's and transformers' weights were unreadable
    to the group and others while every other file of the folder was not. Only for files the toolkit wrote."""
    for path in map(Path, paths):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and not file.is_symlink():
                os.chmod(file, umask_mode())


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through, piece by piece: a temporary file beside it, renamed into
    place (with the umask's permissions, not mkstemp's 0600) when the block ends without an error.
    An OS error names `path`, never the temporary file the user has not heard of."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if exc.filename not in (None, tmp, os.fspath(path.parent)):
            raise  # another file's error (an input read while writing): its own name
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place (`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader never sees half a file."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

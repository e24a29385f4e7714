"""Atomic writes: a reader, or a crash, never sees half a file or half a directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _user_mode(mode: int) -> int:
    """`mode` less the process's umask: what a plain open() or mkdir() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, _user_mode(0o666))  # mkstemp's 0600 would stay on the renamed file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


@contextmanager
def staging_directory(beside: Path) -> Iterator[Path]:
    """A fresh hidden directory next to `beside` (same file system, so its contents rename in place) with the
    user's normal mode; removed on exit with whatever was not moved out of it."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}."))
    tmp.chmod(_user_mode(0o777))  # mkdtemp's 0700 would stay on a renamed directory
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fix_modes(directory: Path) -> None:
    """Give the files in `directory` the user's normal mode (safetensors writes 0600)."""
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(_user_mode(0o666))

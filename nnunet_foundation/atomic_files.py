"""Writing files so that a kill at any moment leaves either the old file or the new one, never half of one.

The content goes to a temporary file in the same folder (same file system, so the rename is atomic), is flushed to
disk, and only then replaces the target with ``os.replace``. A process killed before the rename leaves a
``.<name>.tmp<pid>`` file behind and the target untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterator


def temporary_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path to write to; on success it replaces ``path``, on an exception it is removed."""
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` then replace ``path`` with the result."""
    with atomic_output(path) as tmp:
        write(tmp)


def write_json_atomically(data, path: str, **json_kwargs) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, **{"indent": 2, **json_kwargs})

    write_atomically(path, write)

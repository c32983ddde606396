"""Atomic file writes: a reader (or a run after a crash) finds the old file or the new one,
never a part of one.

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)

The new contents go to a fresh temporary file in the same folder; once written they are
flushed to disk (fsync), moved over the target (``os.replace``) and the folder's entry is
flushed too. On an error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside *path* for the writer to write to; see the module docstring.

    The temporary name is hidden and unique (``.NAME.<random><suffix>``), so two writers of the
    same file never share one; *suffix* ends it: ``.tmp.npz`` for ``np.savez``, which adds
    ``.npz`` to any other name. The file is created by the writer, with the usual permissions.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write *data* (text as UTF-8) to *path* atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable. Not every system can open a folder (Windows cannot):
    there the rename is as durable as the system makes it."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)

"""vestis.atomic: the one way files are replaced atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vestis import atomic
from vestis.atomic import atomic_path, write_atomic


def test_the_new_contents_replace_the_file_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "stamp.json"
    path.write_text("old")
    write_atomic(path, '{"epoch": 2}')
    assert path.read_text() == '{"epoch": 2}'
    write_atomic(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["stamp.json"]


def test_a_failed_write_leaves_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_the_file_and_its_folder_are_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: flushed.append(fd) or real_fsync(fd))
    write_atomic(tmp_path / "a.bin", b"data")
    assert len(flushed) == 2  # the temporary file, then the folder


def test_the_temporary_is_hidden_beside_the_target_with_the_given_suffix(tmp_path):
    path = tmp_path / "embeddings.npz"
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".embeddings.npz.")
        np.savez(tmp, x=np.arange(3))  # np.savez adds .npz to any other name
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.npz"]


def test_the_file_gets_the_permissions_of_any_new_file(tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    write_atomic(tmp_path / "atomic", b"")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode

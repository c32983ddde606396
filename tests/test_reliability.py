"""Reliability on real files: full disks, hostile inputs, killed writers (issue items 10, 11
and the reliability suite). Small generated images and the lite0 model keep it short."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def vestis(*args, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (this interpreter, this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "vestis.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, check=check, **kwargs)


def luma_csv(luma_rows, data_dir, out: Path, rows: slice) -> Path:
    chosen = luma_rows[rows]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(chosen[0]))
        writer.writeheader()
        for row in chosen:
            writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
    return out


# -- item 10: a full disk ----------------------------------------------------------------------
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs "
                            "/mnt"], capture_output=True)
    return probe.returncode == 0


FULL_DISK_SCRIPT = """
set -e
mount -t tmpfs -o size=4m tmpfs "$MNT"
cp -r "$CATALOG" "$MNT/c"
dd if=/dev/zero of="$MNT/fill" bs=4k count=2000 2>/dev/null || true
truncate -s "-$FREE" "$MNT/fill"
set +e
"$PY" -m vestis.cli index "$MORE" --catalog "$MNT/c" 2>"$OUT/index.err"
echo $? > "$OUT/index.rc"
rm "$MNT/fill"
"$PY" -m vestis.cli info --catalog "$MNT/c" > "$OUT/info.out" 2>&1
echo $? > "$OUT/info.rc"
"""


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory, luma_rows, data_dir) -> Path:
    """A catalog of 8 Luma photos, made by vestis index (copy it before changing it)."""
    folder = tmp_path_factory.mktemp("small")
    vestis("index", luma_csv(luma_rows, data_dir, folder / "a.csv", slice(0, 8)),
           "--catalog", folder / "catalog", check=True)
    return folder / "catalog"


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm to mount a small tmpfs")
@pytest.mark.parametrize("free, words", [("64K", "database or disk is full"),
                                         ("160K", "the index could not be saved")])
def test_a_full_disk_is_one_line_and_the_catalog_survives_it(
        tmp_path, small_catalog, luma_rows, data_dir, free, words):
    """A catalog on a 4 MB tmpfs with only ``free`` left: vestis index fails with one line
    naming the full disk (SQLite's own words, or the index save's), never a traceback, and
    once space is freed the catalog is whole (index in sync with the store)."""
    catalog = small_catalog
    more = luma_csv(luma_rows, data_dir, tmp_path / "b.csv", slice(8, 29))
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MNT": str(tmp_path / "mnt"),
           "CATALOG": str(catalog), "FREE": free, "PY": sys.executable, "MORE": str(more),
           "OUT": str(tmp_path)}
    subprocess.run(["unshare", "-rm", "bash", "-c", FULL_DISK_SCRIPT], env=env, check=True,
                   timeout=120)
    error = (tmp_path / "index.err").read_text()
    lines = [line for line in error.splitlines() if line.strip() and "img/s" not in line]
    assert (tmp_path / "index.rc").read_text().strip() == "2", error
    assert "Traceback" not in error and len(lines) == 1, error
    assert "disk is full" in lines[0] and words in lines[0], lines[0]
    info = (tmp_path / "info.out").read_text()
    assert (tmp_path / "info.rc").read_text().strip() == "0", info
    assert '"index_in_sync": true' in info or "index_in_sync: True" in info, info

"""Reliability on real files: full disks, hostile inputs, killed writers (issue items 10, 11
and the reliability suite). Small generated images and the lite0 model keep it short."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_luma_rows

REPO = Path(__file__).resolve().parents[1]


def vestis(*args, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (this interpreter, this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "vestis.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, check=check, **kwargs)


def luma_csv(luma_rows, data_dir, out: Path, rows: slice) -> Path:
    return write_luma_rows(luma_rows[rows], data_dir, out)


# -- item 10: a full disk ----------------------------------------------------------------------
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs "
                            "/mnt"], capture_output=True)
    return probe.returncode == 0


FULL_DISK_SCRIPT = """
mount -t tmpfs -o size=4m tmpfs "$MNT" || exit 3
for free in 64K 360K; do
    rm -rf "$MNT/c" "$MNT/fill"
    cp -r "$CATALOG" "$MNT/c"
    dd if=/dev/zero of="$MNT/fill" bs=4k count=2000 2>/dev/null
    truncate -s "-$free" "$MNT/fill"
    "$PY" -m vestis.cli index "$MORE" --catalog "$MNT/c" 2>"$OUT/index-$free.err"
    echo $? > "$OUT/index-$free.rc"
done
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
def test_a_full_disk_is_one_line_and_the_catalog_survives_it(
        tmp_path, small_catalog, luma_rows, data_dir):
    """A catalog on a 4 MB tmpfs with 64 KB left, then 360 KB: vestis index fails with one
    line naming the full disk, in SQLite's words or the index save's, never a traceback;
    once space is freed the catalog is whole (index in sync with the store)."""
    more = luma_csv(luma_rows, data_dir, tmp_path / "b.csv", slice(8, 29))
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MNT": str(tmp_path / "mnt"),
           "CATALOG": str(small_catalog), "PY": sys.executable, "MORE": str(more),
           "OUT": str(tmp_path)}
    subprocess.run(["unshare", "-rm", "bash", "-c", FULL_DISK_SCRIPT], env=env, check=True,
                   timeout=120)
    for free, words in (("64K", "database or disk is full"),
                        ("360K", "the index could not be saved")):
        error = (tmp_path / f"index-{free}.err").read_text()
        lines = [line for line in error.splitlines() if line.strip() and "img/s" not in line]
        assert (tmp_path / f"index-{free}.rc").read_text().strip() == "2", error
        assert "Traceback" not in error and len(lines) == 1, error
        assert "disk is full" in lines[0] and words in lines[0], lines[0]
    info = (tmp_path / "info.out").read_text()
    assert (tmp_path / "info.rc").read_text().strip() == "0", info
    assert "index_in_sync: True" in info or '"index_in_sync": true' in info, info


# -- item 11: hostile sources, each a one-line error naming the file ---------------------------
def write_csv(path: Path, rows: list[str], photo: Path) -> Path:
    path.write_bytes(("\n".join(["image,item_id,x1,y1,x2,y2,colour", *rows]) + "\n")
                     .replace("PHOTO", str(photo)).encode())
    return path


@pytest.mark.parametrize("box", ["1e309,0,10,10", "0,0,-5,10", "nan,0,10,10", "5,5,5,9",
                                 "0,0,1e30,10"])
def test_a_bad_box_names_the_csv_line(tmp_path, box):
    from vestis.catalog import read_source

    source = write_csv(tmp_path / "s.csv", ["PHOTO,a,0,0,10,10,red", f"PHOTO,b,{box},red"],
                       tmp_path / "p.jpg")
    with pytest.raises(ValueError, match=r"s\.csv:3: bad box"):
        read_source(source)


def test_a_csv_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from vestis.catalog import read_source

    source = tmp_path / "latin1.csv"
    source.write_bytes("image,item_id,name\na.jpg,a,plain\nb.jpg,b,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv:3: not UTF-8 text \(byte 0xe9\)"):
        read_source(source)


def test_conflicting_duplicate_rows_are_an_error_and_identical_ones_are_merged(tmp_path):
    from vestis.catalog import read_source

    photo = tmp_path / "p.jpg"
    same = write_csv(tmp_path / "same.csv", ["PHOTO,a,,,,,red", "PHOTO,a,,,,,red",
                                             "PHOTO,a,0,0,9,9,red"], photo)
    assert [(r.item_id, r.box) for r in read_source(same)] == [("a", None), ("a", (0, 0, 9, 9))]
    for rows, line in ((["PHOTO,a,,,,,red", "PHOTO,b,,,,,red"], 3),
                       (["PHOTO,a,,,,,red", "x.jpg,c,,,,,red", "PHOTO,a,,,,,blue"], 4)):
        with pytest.raises(ValueError, match=rf"conflict\.csv:{line}: image .* is also on "
                                             r"line 2 with a different item_id or metadata"):
            read_source(write_csv(tmp_path / "conflict.csv", rows, photo))


def test_control_characters_never_reach_an_item_id(tmp_path):
    from vestis.catalog import read_source

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "coat\nred.jpg").write_bytes(b"x")
    (tmp_path / "photos" / "hood\tie").mkdir()
    (tmp_path / "photos" / "hood\tie" / "1.jpg").write_bytes(b"x")
    assert sorted(r.item_id for r in read_source(tmp_path / "photos")) == ["coat_red",
                                                                          "hood_ie"]
    source = tmp_path / "ids.csv"
    source.write_text('image,item_id\na.jpg,"two\nlines"\n')
    with pytest.raises(ValueError, match=r"ids\.csv:3: item_id 'two\\nlines' has a control"):
        read_source(source)


def test_heic_photos_in_a_folder_are_reported_not_skipped(tmp_path, data_dir):
    """Pillow here reads no HEIC: each such file is a failure naming it and the format."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(data_dir / "luma" / "images" / "mh06-blue_main.jpg", folder / "a.jpg")
    (folder / "b.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    result = vestis("index", folder, "--catalog", tmp_path / "catalog")
    assert result.returncode == 1, result.stderr
    assert "b.HEIC: HEIC photos are not supported; convert them to JPEG or PNG" in result.stderr
    assert "indexed 1 images (0 already present, 1 failed)" in result.stdout


def test_describe_refuses_a_photo_too_small_to_describe(tmp_path):
    from PIL import Image

    from vestis.images import ImageError
    from vestis.models.attributes import load_attribute_model

    Image.new("RGB", (1, 1), (40, 40, 40)).save(tmp_path / "dot.png")
    with pytest.raises(ImageError) as refused:
        load_attribute_model().describe(tmp_path / "dot.png")
    assert str(refused.value) == (f"{tmp_path / 'dot.png'}: 1x1 pixels is too small to "
                                  "describe (at least 32x32 is needed)")


def test_vestis_eval_lists_every_bad_file_not_just_the_first(tmp_path, luma_rows, data_dir):
    source = luma_csv(luma_rows, data_dir, tmp_path / "eval.csv", slice(0, 12))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a photo")
    truncated = (data_dir / "luma" / "images" / "mh06-blue_main.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    padding = "," * (len(luma_rows[0]) - 2)  # the other columns, empty
    with open(source, "a") as handle:
        for name in ("empty.jpg", "notes.jpg", "cut.jpg"):
            handle.write(f"{tmp_path / name},{luma_rows[0]['item_id']}{padding}\n")
    result = vestis("eval", source)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "3 images could not be used" in result.stderr
    for name, reason in (("empty.jpg", "empty file"), ("notes.jpg", "not an image"),
                         ("cut.jpg", "truncated")):
        assert any(name in line and reason in line for line in result.stderr.splitlines()), \
            result.stderr


# -- the reliability suite (bench/bench_reliability.py runs it longer) -------------------------
@pytest.fixture(scope="module")
def soak():
    """bench/bench_reliability.py, imported: the tests run its phases, smaller."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_reliability
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench_reliability


def test_kill_9_at_random_points_keeps_every_stored_image_searchable(tmp_path, soak,
                                                                     data_dir):
    """Two SIGKILLs of vestis index just after a stored batch (the soak in
    bench/bench_reliability.py also kills remove and reindex, at random moments); after
    each, the index holds exactly the store's ids and every stored image is found by its
    own photo; finally every source image is stored once."""
    source = soak.luma_source(tmp_path / "source.csv", slice(0, 16), data_dir)
    report = soak.kill_loop(tmp_path / "catalog", source, kills=2, seed=1,
                            operations=("index",), mid_batch=1.0)
    assert report.killed == 2 and report.checks == 3


def test_fuzzed_images_through_index_search_and_http(tmp_path, soak, data_dir):
    """Odd modes and formats, truncations, bit flips and huge headers: each file is
    indexed or refused with a one-line reason naming it, by the catalog and over HTTP."""
    from tests.test_serve import serving
    from vestis.serve import create_app

    corpus = soak.fuzz_corpus(tmp_path / "fuzz", data_dir / "luma" / "images" /
                              "mh06-blue_main.jpg", seed=0, flips=6)
    report = soak.fuzz_catalog(tmp_path / "catalog", corpus, set())
    assert report.indexed >= 14 and report.refused >= 10  # modes decode; broken files don't
    with serving(create_app(tmp_path / "catalog")) as client:
        soak.fuzz_http(str(client.base_url), corpus, report)
    assert report.http[200] >= 14 and report.http.get(422, 0) >= 8


def test_http_abuse_gets_one_line_answers_and_the_server_stays_up(tmp_path, soak, data_dir):
    from tests.test_serve import TOKEN, serving
    from vestis.serve import create_app

    source = soak.luma_source(tmp_path / "source.csv", slice(0, 4), data_dir)
    assert soak.run_cli("index", source, "--catalog", tmp_path / "catalog").returncode == 0
    app = create_app(tmp_path / "catalog", token=TOKEN, workers=1, queue=4)
    with serving(app) as client:
        counts = soak.http_abuse(str(client.base_url), TOKEN,
                                 data_dir / "luma" / "images" / "mh06-blue_main.jpg",
                                 burst=20, many_files=30)
    assert counts["422"] >= 12 and counts["503"] >= 1 and counts["200"] >= 5, counts

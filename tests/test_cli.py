"""The command line, run as a user runs it: the installed ``vestis`` script."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_luma_subset

VESTIS = str(Path(sys.executable).with_name("vestis"))


def vestis(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([VESTIS, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"vestis {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def rows_of(csv_path):
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, luma_subset_csv):
    catalog = tmp_path_factory.mktemp("cli") / "catalog"
    first = vestis("index", luma_subset_csv, "--catalog", catalog)
    return catalog, first


def test_index_then_search_returns_the_query_item_first(indexed, luma_subset_csv):
    catalog, first = indexed
    assert "indexed" in first.stdout and "images/s" in first.stdout
    row = rows_of(luma_subset_csv)[2]
    result = vestis("search", row["image"], "--catalog", catalog, "-k", "5", "--json", "--whole")
    [whole] = json.loads(result.stdout)["garments"]
    assert whole["group"] == "whole image"
    assert whole["results"][0]["item_id"] == row["item_id"]


def test_where_returns_only_that_category(indexed, luma_subset_csv):
    catalog, _ = indexed
    rows = rows_of(luma_subset_csv)
    category = rows[-1]["category"]
    out = vestis(
        "search",
        rows[0]["image"],
        "-c",
        catalog,
        "-k",
        "20",
        "--json",
        "--where",
        f"category={category}",
    )
    garments = json.loads(out.stdout)["garments"]
    results = [r for garment in garments for r in garment["results"]]
    assert results and {r["metadata"]["category"] for r in results} == {category}


def test_indexing_twice_leaves_the_count_unchanged(indexed, luma_subset_csv):
    catalog, _ = indexed
    before = json.loads(vestis("info", "-c", catalog, "--json").stdout)
    again = vestis("index", luma_subset_csv, "--catalog", catalog)
    after = json.loads(vestis("info", "-c", catalog, "--json").stdout)
    assert "indexed 0 images" in again.stdout
    assert (after["items"], after["images"]) == (before["items"], before["images"])


def test_remove_makes_the_item_disappear(tmp_path, luma_subset_csv):
    catalog = tmp_path / "catalog"
    vestis("index", luma_subset_csv, "--catalog", catalog)
    row = rows_of(luma_subset_csv)[0]
    vestis("remove", row["item_id"], "--catalog", catalog)
    out = vestis("search", row["image"], "-c", catalog, "-k", "50", "--json", "--whole")
    [whole] = json.loads(out.stdout)["garments"]
    assert row["item_id"] not in {r["item_id"] for r in whole["results"]}
    missing = vestis("remove", row["item_id"], "--catalog", catalog, check=False)
    assert missing.returncode == 2 and "no item" in missing.stderr


def test_bad_files_are_named_with_a_reason_and_the_rest_indexed(tmp_path, data_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = sorted((data_dir / "luma" / "images").glob("mh0*_main.jpg"))[:4]
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(images[0].read_bytes()[:1500])
    (folder / "notes.jpg").write_text("a text file\n")
    result = vestis("index", folder, "--catalog", tmp_path / "catalog", check=False)
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2
    assert any("broken.jpg" in line and "truncated" in line for line in failed)
    assert any("notes.jpg" in line and "not an image" in line for line in failed)
    info = json.loads(vestis("info", "-c", tmp_path / "catalog", "--json").stdout)
    assert info["images"] == len(images)


def test_kill_9_during_index_then_rerun_gives_every_image_once(tmp_path, luma_rows, data_dir):
    source = write_luma_subset(luma_rows, data_dir, tmp_path / "catalog.csv", n_products=40)
    total = len(rows_of(source))
    catalog = tmp_path / "catalog"
    command = [VESTIS, "index", str(source), "--catalog", str(catalog), "--batch-size", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stored = wait_for_images(catalog / "catalog.db", minimum=8, process=process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert 0 < stored < total, "the kill must land in the middle of the ingest"

    vestis(*command[1:])
    db = sqlite3.connect(catalog / "catalog.db")
    paths = [row[0] for row in db.execute("SELECT path FROM images")]
    db.close()
    assert len(paths) == len(set(paths)) == total
    info = json.loads(vestis("info", "-c", catalog, "--json").stdout)
    assert info["indexed_vectors"] == info["images"] == total


def wait_for_images(db_path: Path, minimum: int, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if db_path.exists():
            try:
                with sqlite3.connect(db_path, timeout=1) as db:
                    count = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= minimum:
                return count
        time.sleep(0.05)
    raise AssertionError("the ingest never committed a batch")


def test_embed_writes_vectors_and_ids_in_row_order(tmp_path, luma_subset_csv):
    out = tmp_path / "vectors.npz"
    vestis("embed", luma_subset_csv, "--model", "lite0", "--out", out)
    data = np.load(out)
    rows = rows_of(luma_subset_csv)
    assert data["embeddings"].shape == (len(rows), 1280)
    assert list(data["item_ids"]) == [row["item_id"] for row in rows]
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)


def test_unknown_model_and_missing_source_are_one_line_errors(tmp_path):
    result = vestis("index", tmp_path / "nowhere", "--catalog", tmp_path / "c", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error:")
    result = vestis("embed", tmp_path, "--model", "nope", "--out", tmp_path / "x.npz", check=False)
    assert result.returncode == 2 and "error:" in result.stderr
    result = vestis("search", __file__, "--catalog", tmp_path / "none", check=False)
    assert result.returncode == 2 and "not a vestis catalog" in result.stderr
    assert not (tmp_path / "none").exists()


def read_only_mount(source: Path, target: Path) -> list[str]:
    """A shell prefix that runs a command in a private mount namespace where ``target`` is
    ``source`` mounted read-only (skips when this machine does not allow it)."""
    import shutil

    target.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    mount = (f"mount --bind '{source}' '{target}' && "
             f"mount -o remount,ro,bind '{target}' && ")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount + f"! touch '{target}/x'"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("read-only bind mounts need privileges this machine does not give")
    return ["unshare", "-m", "sh", "-c", mount + 'exec "$@"', "sh"]


def test_a_read_only_catalog_is_searched_and_refuses_writes_in_one_line(
        tmp_path, data_dir, encoder):
    from vestis.catalog import Catalog

    photos = [data_dir / "luma" / "images" / f"mh06-blue_{view}.jpg" for view in ("main", "back")]
    with Catalog(tmp_path / "catalog", encoder=encoder) as catalog:
        assert catalog.add(photos).added == 2
    mounted = tmp_path / "mounted"
    prefix = read_only_mount(tmp_path / "catalog", mounted)

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, VESTIS, *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    info = run("info", "--catalog", mounted, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["images"] == 2
    found = run("search", photos[0], "--whole", "-k", "1", "--catalog", mounted)
    assert found.returncode == 0, found.stderr
    assert "mh06-blue_main" in found.stdout
    refused = run("remove", "mh06-blue_main", "--catalog", mounted)
    assert refused.returncode == 2 and refused.stderr.startswith("error:")
    assert "read-only" in refused.stderr and "Traceback" not in refused.stderr


def test_update_refuses_item_id_and_names_set_in_its_errors(tmp_path, encoder):
    from typer.testing import CliRunner

    from vestis.catalog import Catalog
    from vestis.cli import app

    with Catalog(tmp_path / "catalog", encoder=encoder) as catalog:
        catalog.add_vectors(["a"], np.eye(1, encoder.dim, dtype=np.float32),
                            model_id=encoder.model_id)
    base = ["update", "a", "--catalog", str(tmp_path / "catalog")]
    result = CliRunner().invoke(app, [*base, "--set", "item_id=b"])
    assert result.exit_code == 2 and "reserved" in result.output
    result = CliRunner().invoke(app, [*base, "--set", "colour"])
    assert result.exit_code == 2 and "--set expects key=value" in result.output
    assert "--where" not in result.output
    with Catalog(tmp_path / "catalog", encoder=encoder) as catalog:
        assert catalog.get("a").metadata == {}


def test_a_bad_model_or_index_leaves_no_half_created_catalog(tmp_path, data_dir):
    photo = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    for option in (["--model", "nosuchmodel"], ["--model", "lite0", "--index", "NoSuchIndex"]):
        catalog = tmp_path / option[-1]
        result = vestis("index", photo, "--catalog", catalog, *option, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error:")
        assert not catalog.exists()


def test_every_catalog_command_works_on_a_milvus_lite_uri(tmp_path, luma_subset_csv):
    """index, search (filters, per garment), update, remove, info and reindex on a
    ``milvus-lite:`` catalog, with the embedded catalog's answers."""
    pytest.importorskip("milvus_lite")
    uri, local = f"milvus-lite:{tmp_path / 'shop.db'}", tmp_path / "local"
    rows = rows_of(luma_subset_csv)
    for catalog in (uri, local):
        vestis("index", luma_subset_csv, "--catalog", catalog, "--model", "lite0")
    again = vestis("index", luma_subset_csv, "--catalog", uri)
    assert f"indexed 0 images ({len(rows)} already present" in again.stdout

    def search(catalog, *options):
        out = vestis("search", rows[2]["image"], "--catalog", catalog, "-k", "5", "--json",
                     *options).stdout
        return [[(r["item_id"], r["image_id"], round(r["score"], 4)) for r in g["results"]]
                for g in json.loads(out)["garments"]]

    category = rows[-1]["category"]
    for options in (["--whole"], ["--whole", "--where", f"category={category}"], []):
        assert search(uri, *options) == search(local, *options), options
    assert search(uri, "--whole")[0][0][0] == rows[2]["item_id"]

    item = rows[0]["item_id"]
    updated = json.loads(vestis("update", item, "--catalog", uri, "--set", "on_sale=yes").stdout)
    assert updated["metadata"]["on_sale"] == "yes"
    assert [r[0] for r in search(uri, "--whole", "--where", "on_sale=yes")[0]] == [item]
    assert "removed item" in vestis("remove", item, "--catalog", uri).stdout
    gone = vestis("remove", item, "--catalog", uri, check=False)
    assert gone.returncode == 2 and gone.stderr.startswith("error:")
    info = json.loads(vestis("info", "--catalog", uri, "--json").stdout)
    assert info["path"] == uri and info["index"] == "FLAT" and info["index_in_sync"]
    assert info["images"] == len(rows) - sum(r["item_id"] == item for r in rows)
    assert "HNSW" in vestis("reindex", "--catalog", uri, "--index", "hnsw").stdout
    assert json.loads(vestis("info", "--catalog", uri, "--json", "--recall", "20").stdout)[
        "recall@10_vs_flat"] >= 0.9


def test_a_missing_or_unreachable_milvus_catalog_is_one_line(tmp_path):
    pytest.importorskip("milvus_lite")
    for args in (["info", "--catalog", f"milvus-lite:{tmp_path / 'none.db'}"],
                 ["info", "--catalog", "milvus://127.0.0.1:1/shop"]):
        result = vestis(*args, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []

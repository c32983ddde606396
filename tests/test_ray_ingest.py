"""``vestis index --ray``: the ingest on Ray Data stores what the plain ingest stores.

The Ray tests (marked ``slow``: a local Ray takes seconds to start) use a handful of
generated photos, one of them named by a ``file://`` URI, plus a corrupt file and a missing
one, and a local Ray instance of 2 CPUs without a dashboard, started and stopped here.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vestis.catalog.sources import read_csv
from vestis.cli import ray_argv

VESTIS = str(Path(sys.executable).with_name("vestis"))


def make_source(folder: Path, photos: int = 6) -> Path:
    """A CSV of ``photos`` generated JPEGs (3 items; the second photo by ``file://`` URI, the
    third with a box), a corrupt file and a missing one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for n in range(photos):
        pixels = rng.integers(0, 255, (90 + 7 * n, 70 + 5 * n, 3), dtype=np.uint8)
        path = folder / f"photo{n}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        image = path.resolve().as_uri() if n == 1 else str(path)
        box = ("5", "6", "60", "80") if n == 2 else ("", "", "", "")
        rows.append([image, f"item{n % 3}", "Tops" if n % 2 else "Dresses", *box])
    (folder / "corrupt.jpg").write_bytes(b"not a photo at all")
    rows.append([str(folder / "corrupt.jpg"), "bad", "Tops", "", "", "", ""])
    rows.append([str(folder / "missing.jpg"), "gone", "Tops", "", "", "", ""])
    source = folder / "source.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "item_id", "category", "x1", "y1", "x2", "y2"])
        writer.writerows(rows)
    return source


def stored(catalog_path: Path) -> dict[int, tuple[str, str, np.ndarray]]:
    """image id -> (path, item id, vector) of every stored image."""
    from vestis.catalog import Catalog

    with Catalog(catalog_path) as catalog:
        store = catalog._store
        ids = [int(i) for i in store.image_ids()]
        vectors = store.vectors_by_id(ids)
        rows = store.images_by_id(ids)
    return {i: (rows[i].path, rows[i].item_id, vectors[n]) for n, i in enumerate(ids)}


# -- without Ray ------------------------------------------------------------------------
def test_a_bare_ray_flag_means_a_local_instance_and_an_address_is_kept():
    assert ray_argv(["index", "src", "--ray"]) == ["index", "src", "--ray=local"]
    assert ray_argv(["index", "--ray", "src", "-c", "x"]) == ["index", "--ray=local", "src",
                                                              "-c", "x"]
    assert ray_argv(["index", "src", "--ray", "--ray-workers", "2"])[2] == "--ray=local"
    for address in ("auto", "ray://head:10001", "10.0.0.5:6379"):
        assert ray_argv(["index", "src", "--ray", address]) == ["index", "src", "--ray",
                                                                address]


def test_a_csv_keeps_file_uris_and_the_plain_ingest_reads_them(tmp_path):
    from vestis.catalog import Catalog

    source = make_source(tmp_path / "photos", photos=2)
    records = read_csv(source)
    assert records[1].path == (tmp_path / "photos" / "photo1.jpg").resolve().as_uri()
    with Catalog(tmp_path / "catalog") as catalog:
        report = catalog.add(records[:2])
    assert (report.added, report.failed) == (2, [])
    assert records[1].path in {path for path, _, _ in stored(tmp_path / "catalog").values()}


def test_uris_are_told_from_paths_and_a_missing_one_is_reported(tmp_path):
    from vestis.images import ImageError, file_digest, is_uri, load_image

    missing = (tmp_path / "none.jpg").as_uri()
    assert is_uri(missing) and is_uri("s3://bucket/a.jpg") and is_uri("https://h/a.jpg")
    assert not is_uri(str(tmp_path / "a.jpg")) and not is_uri("C:/photos/a.jpg")
    assert not is_uri(tmp_path)  # a Path is a path
    sha, reason = file_digest(missing)
    assert sha is None and reason.startswith("cannot be read")
    with pytest.raises(ImageError, match="file not found"):
        load_image(missing)


# -- on Ray -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def ingest(source: Path, catalog_path: Path, runner_options: dict | None):
    from vestis.catalog import Catalog
    from vestis.catalog.ray_ingest import RayRunner

    with Catalog(catalog_path) as catalog:
        catalog.encoder.batch_size = 3  # several batches, one of them with both bad files
        runner = None
        if runner_options is not None:
            runner = RayRunner.for_encoder(catalog.encoder, catalog.model_name,
                                           **runner_options)
            runner.start()
        try:
            return catalog.add(source, runner=runner)
        finally:
            if runner is not None:
                runner.stop()


@pytest.mark.slow
def test_ray_ingest_stores_the_plain_ingests_ids_and_vectors_bit_for_bit(tmp_path, local_ray):
    source = make_source(tmp_path / "photos")
    plain = ingest(source, tmp_path / "plain", None)
    on_ray = ingest(source, tmp_path / "ray", {"workers": 2})
    assert (on_ray.added, on_ray.skipped) == (plain.added, plain.skipped) == (6, 0)
    assert sorted(on_ray.failed) == sorted(plain.failed)
    assert {Path(path).name for path, _ in on_ray.failed} == {"corrupt.jpg", "missing.jpg"}
    expected, got = stored(tmp_path / "plain"), stored(tmp_path / "ray")
    assert sorted(got) == sorted(expected)
    for image_id, (path, item_id, vector) in expected.items():
        assert got[image_id][:2] == (path, item_id)
        assert np.array_equal(got[image_id][2], vector), path
    assert any(path.startswith("file://") for path, _, _ in got.values())
    # Idempotent: a second Ray run adds nothing and fails the same files.
    again = ingest(source, tmp_path / "ray", {"workers": 1})
    assert (again.added, again.skipped) == (0, 6)
    assert sorted(again.failed) == sorted(plain.failed)


@pytest.mark.slow
def test_vestis_index_ray_reports_bad_files_as_without_ray(tmp_path):
    pytest.importorskip("ray.data")
    source = make_source(tmp_path / "photos", photos=3)

    def index(catalog: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([VESTIS, "index", str(source), "-c", str(tmp_path / catalog),
                               *extra], capture_output=True, text=True, timeout=600)

    plain, on_ray = index("plain"), index("ray", "--ray", "--ray-workers", "1")
    assert plain.returncode == on_ray.returncode == 1  # bad files: exit 1, the rest added

    def failures(result):
        return sorted(line[line.index("failed: "):] for line in result.stderr.splitlines()
                      if "failed: " in line)

    assert failures(on_ray) == failures(plain) and len(failures(plain)) == 2
    assert "indexed 3 images" in on_ray.stdout
    assert sorted(stored(tmp_path / "ray")) == sorted(stored(tmp_path / "plain"))


@pytest.mark.slow
def test_reembedding_a_catalog_on_ray_stores_the_plain_vectors(tmp_path, local_ray):
    """``vestis adapt --catalog --ray``'s re-embedding step, with and without Ray."""
    import shutil

    from vestis.catalog import Catalog
    from vestis.catalog.ray_ingest import RayRunner
    from vestis.catalog.reembed import reembed

    ingest(make_source(tmp_path / "photos"), tmp_path / "base", None)
    for name in ("plain", "ray"):
        shutil.copytree(tmp_path / "base", tmp_path / name)

    def on_ray(catalog: Catalog) -> RayRunner:
        return RayRunner.for_encoder(catalog.encoder, catalog.model_name, workers=2)

    assert reembed(Catalog(tmp_path / "plain"), "lite0") == 6
    assert reembed(Catalog(tmp_path / "ray"), "lite0", runner=on_ray) == 6
    plain = {path: (item, vector) for path, item, vector in stored(tmp_path / "plain").values()}
    got = {path: (item, vector) for path, item, vector in stored(tmp_path / "ray").values()}
    assert sorted(got) == sorted(plain)
    for path, (item, vector) in plain.items():
        assert vector.shape == (1280,)  # lite0's vectors, not the catalog's old model's
        assert got[path][0] == item and np.array_equal(got[path][1], vector), path
    with Catalog(tmp_path / "ray") as catalog:
        assert catalog.model_name == "lite0"


@pytest.mark.slow
def test_reembedding_a_milvus_catalog_on_ray_stores_the_plain_vectors(tmp_path, local_ray):
    """``vestis adapt --catalog milvus-lite:… --ray``'s re-embedding step: the new
    generation holds the vectors a directory re-embedded without Ray holds."""
    pytest.importorskip("milvus_lite")
    from vestis.catalog import Catalog
    from vestis.catalog.ray_ingest import RayRunner
    from vestis.catalog.reembed import reembed

    location = f"milvus-lite:{tmp_path / 'shop.db'}#shop"
    source = make_source(tmp_path / "photos")
    ingest(source, tmp_path / "plain", None)
    ingest(source, location, None)

    def on_ray(catalog: Catalog) -> RayRunner:
        return RayRunner.for_encoder(catalog.encoder, catalog.model_name, workers=2)

    assert reembed(Catalog(tmp_path / "plain"), "lite0") == 6
    assert reembed(Catalog(location), "lite0", runner=on_ray) == 6
    plain = {path: (item, vector) for path, item, vector in stored(tmp_path / "plain").values()}
    got = {path: (item, vector) for path, item, vector in stored(location).values()}
    assert sorted(got) == sorted(plain)
    for path, (item, vector) in plain.items():
        assert got[path][0] == item
        np.testing.assert_allclose(got[path][1], vector, atol=1e-6, err_msg=path)
    with Catalog(location) as catalog:
        assert catalog.model_name == "lite0" and catalog._store.prefix == "shop_g1"

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.conftest import STORES, catalog_location
from vestis.catalog import Catalog, ModelMismatchError
from vestis.catalog.catalog import INDEX_NAME, INDEX_STAMP_NAME


@pytest.fixture(scope="module", params=STORES)
def built(request, tmp_path_factory, luma_subset_csv, encoder):
    """The Luma subset in a catalog of each store (a directory, a Milvus Lite file), whole
    photos (crops at ingest: tests/test_garment_search.py)."""
    catalog = Catalog(catalog_location(request.param, tmp_path_factory.mktemp("catalog")),
                      encoder=encoder)
    report = catalog.add(luma_subset_csv, crop="none")
    yield catalog, report
    catalog.close()


def rows_of(csv_path):
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_ingest_counts_items_and_images(built, luma_subset_csv):
    catalog, report = built
    rows = rows_of(luma_subset_csv)
    assert report.added == len(rows) and not report.failed
    assert catalog.num_images == len(rows)
    assert len(catalog) == len({row["item_id"] for row in rows})
    assert catalog.info()["indexed_vectors"] == len(rows)


def test_search_with_a_catalog_image_returns_its_item_first(built, luma_subset_csv):
    catalog, _ = built
    for row in rows_of(luma_subset_csv)[:5]:
        matches = catalog.search(row["image"], k=5)
        assert matches[0].item_id == row["item_id"]
        assert matches[0].score == pytest.approx(1.0, abs=1e-4)
        assert len({m.item_id for m in matches}) == len(matches)  # one entry per item


def test_where_filters_are_equality_combined_by_and(built, luma_subset_csv):
    catalog, _ = built
    rows = rows_of(luma_subset_csv)
    query = rows[0]["image"]
    other_category = next(r["category"] for r in rows if r["category"] != rows[0]["category"])
    matches = catalog.search(query, k=20, where={"category": other_category})
    assert matches and all(m.metadata["category"] == other_category for m in matches)
    both = catalog.search(query, k=20, where={"category": other_category, "view": "back"})
    assert all(m.metadata["view"] == "back" for m in both)
    assert catalog.search(query, k=5, where={"category": "no such category"}) == []


def test_adding_the_same_source_twice_adds_nothing(built, luma_subset_csv):
    catalog, _ = built
    before = (len(catalog), catalog.num_images)
    report = catalog.add(luma_subset_csv)
    assert report.added == 0 and report.skipped == before[1]
    assert (len(catalog), catalog.num_images) == before


def test_update_metadata_is_searchable(built, luma_subset_csv):
    catalog, _ = built
    item = rows_of(luma_subset_csv)[0]["item_id"]
    catalog.update(item, {"on_sale": "yes"})
    matches = catalog.search(rows_of(luma_subset_csv)[0]["image"], k=5, where={"on_sale": "yes"})
    assert [m.item_id for m in matches] == [item]
    assert catalog.get(item).metadata["on_sale"] == "yes"
    with pytest.raises(KeyError):
        catalog.update("no-such-item", {"a": "b"})


def test_remove_makes_the_item_disappear(store, tmp_path, luma_subset_csv, encoder):
    with Catalog(catalog_location(store, tmp_path), encoder=encoder) as catalog:
        catalog.add(luma_subset_csv)
        row = rows_of(luma_subset_csv)[0]
        removed = catalog.remove(row["item_id"])
        assert removed >= 1 and row["item_id"] not in catalog
        assert row["item_id"] not in [m.item_id for m in catalog.search(row["image"], k=50)]
        with pytest.raises(KeyError):
            catalog.remove(row["item_id"])
    # Still gone after reopening, and the index is consistent with the store.
    with Catalog(catalog_location(store, tmp_path), encoder=encoder) as reopened:
        assert row["item_id"] not in [m.item_id for m in reopened.search(row["image"], k=50)]
        assert reopened.info()["indexed_vectors"] == reopened.num_images


def test_a_stale_index_is_rebuilt_from_the_store(tmp_path, luma_subset_csv, encoder):
    path = tmp_path / "cat"
    with Catalog(path, encoder=encoder) as catalog:
        catalog.add(luma_subset_csv)
        count = catalog.num_images
    # Simulate a crash between the store's commit and the index save.
    stamp = json.loads((path / INDEX_STAMP_NAME).read_text())
    (path / INDEX_STAMP_NAME).write_text(json.dumps({**stamp, "epoch": stamp["epoch"] - 1}))
    (path / INDEX_NAME).write_bytes(b"garbage")
    with Catalog(path, encoder=encoder) as reopened:
        row = rows_of(luma_subset_csv)[3]
        assert reopened.search(row["image"], k=1)[0].item_id == row["item_id"]
        assert reopened.info()["indexed_vectors"] == count


def test_vectors_from_another_model_are_refused(store, tmp_path, encoder):
    with Catalog(catalog_location(store, tmp_path), encoder=encoder) as catalog:
        vectors = np.eye(4, encoder.dim, dtype=np.float32)
        assert catalog.add_vectors(list("abcd"), vectors, model_id=encoder.model_id) == 4
        with pytest.raises(ModelMismatchError):
            catalog.add_vectors(["e"], vectors[:1], model_id="lite2")
        with pytest.raises(ValueError, match="shape"):
            catalog.add_vectors(["e"], vectors[:1, :10], model_id=encoder.model_id)
        assert catalog.search(vectors[2], k=1)[0].item_id == "c"
    with pytest.raises(ModelMismatchError):
        Catalog(catalog_location(store, tmp_path), model="lite1")


def test_bad_files_are_reported_and_good_ones_indexed(store, tmp_path, data_dir, encoder):
    folder = tmp_path / "photos"
    (folder / "mh06-blue").mkdir(parents=True)
    good = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    (folder / "mh06-blue" / "front.jpg").write_bytes(good.read_bytes())
    (folder / "back.jpg").write_bytes(
        (data_dir / "luma" / "images" / "mh06-blue_back.jpg").read_bytes()
    )
    (folder / "cut.jpg").write_bytes(good.read_bytes()[:2000])
    (folder / "readme.jpg").write_text("not an image")
    with Catalog(catalog_location(store, tmp_path), encoder=encoder) as catalog:
        report = catalog.add(folder)
        failed = dict(report.failed)
        assert set(failed) == {str(folder / "cut.jpg"), str(folder / "readme.jpg")}
        assert "truncated" in failed[str(folder / "cut.jpg")]
        assert "not an image" in failed[str(folder / "readme.jpg")]
        assert report.added == 2
        assert sorted(catalog.item_ids()) == ["back", "mh06-blue"]


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_catalog_sees_other_writers_and_never_stamps_their_epoch(store, tmp_path, encoder):
    """One catalog object open (a server) while another (the CLI) removes and adds: the first
    searches and writes in step with the store, and what it saves stays consistent."""
    path, model = catalog_location(store, tmp_path), encoder.model_id
    vectors = unit_vectors(8, encoder.dim, seed=0)
    with Catalog(path, encoder=encoder) as server:
        server.add_vectors(list("abcdef"), vectors[:6], model_id=model)
        assert server.search(vectors[0], k=1)[0].item_id == "a"
        with Catalog(path, encoder=encoder) as cli:
            cli.remove("a")
            cli.add_vectors(["g"], vectors[6:7], model_id=model)
        assert server.search(vectors[6], k=1)[0].item_id == "g"
        assert "a" not in [m.item_id for m in server.search(vectors[0], k=10)]
        info = server.info()
        assert info["images"] == info["indexed_vectors"] == 6 and info["index_in_sync"]
        server.add_vectors(["h"], vectors[7:8], model_id=model)
    with Catalog(path, encoder=encoder) as reopened:
        assert reopened.info()["index_in_sync"]
        for n, item in [(6, "g"), (7, "h")]:
            assert reopened.search(vectors[n], k=1)[0].item_id == item


def test_a_saved_index_with_the_right_count_but_other_ids_is_rebuilt(tmp_path, encoder):
    from vestis.catalog.index import FaissIndex

    path = tmp_path / "cat"
    vectors = unit_vectors(3, encoder.dim, seed=1)
    with Catalog(path, encoder=encoder) as catalog:
        catalog.add_vectors(list("abc"), vectors, model_id=encoder.model_id)
    stamp = json.loads((path / INDEX_STAMP_NAME).read_text())
    wrong = FaissIndex(encoder.dim, "Flat")
    wrong.add(np.array([1, 2, 99]), vectors)  # same count; image 3 is missing, 99 is not stored
    wrong.save(path / INDEX_NAME)
    (path / INDEX_STAMP_NAME).write_text(json.dumps(stamp))
    with Catalog(path, encoder=encoder) as reopened:
        assert reopened.search(vectors[2], k=1)[0].item_id == "c"
        assert reopened.info()["index_in_sync"]


def test_two_creators_with_different_models_exactly_one_wins(tmp_path):
    """Two processes create one new catalog at once, with different models and indexes:
    one creates it, the other fails with a clear message, and the catalog stays usable."""
    import threading

    path = tmp_path / "new"
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def create(model: str, index: str | None) -> None:
        start.wait()
        try:
            results[model] = Catalog(path, model=model, index=index)
        except ValueError as exc:  # ModelMismatchError is one
            results[model] = exc

    threads = [threading.Thread(target=create, args=args)
               for args in [("vestis-lite0", None), ("lite0", "hnsw")]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [c for c in results.values() if isinstance(c, Catalog)]
    losers = [e for e in results.values() if isinstance(e, Exception)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert isinstance(losers[0], ModelMismatchError) and "cannot use" in str(losers[0])
    with winners[0] as catalog:
        assert catalog.dim == catalog.encoder.dim
        vectors = unit_vectors(2, catalog.dim, seed=2)
        assert catalog.add_vectors(["a", "b"], vectors, model_id=catalog.model_id) == 2
        assert catalog.search(vectors[1], k=1)[0].item_id == "b"
        assert catalog.info()["index_in_sync"]


def test_every_batch_is_checked_against_the_stored_model_in_its_transaction(tmp_path, encoder):
    from vestis.catalog.catalog import DB_NAME
    from vestis.catalog.store import NewImage, Store

    with Catalog(tmp_path / "cat", encoder=encoder):
        pass
    store = Store(tmp_path / "cat" / DB_NAME)
    vector = unit_vectors(1, encoder.dim, seed=3)[0]
    with pytest.raises(ModelMismatchError, match="built with"):
        store.add_images([NewImage("a", "", "x", vector, {})], {"a": {}}, model_id="lite2")
    with pytest.raises(ModelMismatchError, match="-d"):
        store.add_images([NewImage("a", "", "x", vector[:10], {})], {"a": {}},
                         model_id=encoder.model_id)
    assert store.count_images() == store.count_items() == 0
    assert store.add_images([NewImage("a", "", "x", vector, {})], {"a": {}},
                            model_id=encoder.model_id) != [-1]
    store.close()


def test_an_index_too_small_to_train_is_saved_with_its_vectors(tmp_path, encoder):
    from vestis.catalog.index import FaissIndex

    path = tmp_path / "cat"
    vectors = unit_vectors(20, encoder.dim, seed=4)
    with Catalog(path, encoder=encoder) as catalog:
        catalog.add_vectors([f"i{n}" for n in range(20)], vectors, model_id=encoder.model_id)
        catalog.rebuild_index("ivfpq")
        factory = catalog.factory
    saved = FaissIndex.load(path / INDEX_NAME, factory)
    assert len(saved) == 20 and not saved.is_trained
    assert json.loads((path / INDEX_STAMP_NAME).read_text())["count"] == 20
    with Catalog(path, encoder=encoder) as reopened:
        assert reopened.search(vectors[7], k=1)[0].item_id == "i7"


def test_temporary_files_left_by_a_killed_process_are_removed(tmp_path, encoder):
    import os
    import time

    path = tmp_path / "cat"
    vectors = unit_vectors(2, encoder.dim, seed=5)
    with Catalog(path, encoder=encoder) as catalog:
        catalog.add_vectors(["a"], vectors[:1], model_id=encoder.model_id)
    (path / "uploads").mkdir()
    stale = [path / ".index.faiss.k9x2.tmp", path / ".index.faiss.deleted.npy.k9x3.tmp",
             path / ".index.json.tmp", path / "uploads" / ".0123abcd.jpg.tmp"]
    fresh = path / "uploads" / ".4567ef.jpg.tmp"  # maybe another server writing it now
    for tmp in [*stale, fresh]:
        tmp.write_bytes(b"partial")
    hour_ago = time.time() - 3700
    os.utime(stale[-1], (hour_ago, hour_ago))
    with Catalog(path, encoder=encoder) as catalog:
        catalog.add_vectors(["b"], vectors[1:], model_id=encoder.model_id)
    assert not any(tmp.exists() for tmp in stale) and fresh.exists()


def test_every_write_bumps_the_generation_and_reads_do_not(store, tmp_path, encoder):
    """One counter for every cache: adds, metadata updates, settings and removals each
    move it, as seen by another catalog object (another process); reads never do."""
    path, model = catalog_location(store, tmp_path), encoder.model_id
    vectors = unit_vectors(2, encoder.dim, seed=6)
    with Catalog(path, encoder=encoder) as writer, Catalog(path, encoder=encoder) as reader:
        seen = [reader.generation]
        writer.add_vectors(["a", "b"], vectors, model_id=model)
        seen.append(reader.generation)
        writer.update("a", {"colour": "red"})
        seen.append(reader.generation)
        writer.rebuild_index("hnsw")
        seen.append(reader.generation)
        writer.remove("b")
        seen.append(reader.generation)
        reader.search(vectors[0], k=1)
        reader.get("a")
        reader.info()
        assert reader.generation == seen[-1]
        assert seen == sorted(set(seen)), seen


@pytest.mark.parametrize("store", STORES)
def test_each_store_implements_the_whole_store_interface(store):
    """Every operation of :class:`CatalogStore` is one :class:`LocalStore` and
    :class:`MilvusStore` have, with the same parameters."""
    import importlib
    import inspect

    from vestis.catalog.backend import CatalogStore

    LocalStore = (importlib.import_module("vestis.catalog.local").LocalStore if store == "local"
                  else importlib.import_module("vestis.catalog.milvus").MilvusStore)

    wanted = {name for name in vars(CatalogStore) if not name.startswith("_")}
    assert wanted >= {"add_images", "remove_item", "update_item", "images_by_id",
                      "iter_vectors", "filtered_image_ids", "generation", "search_items"}
    for name in wanted - {"read_only"}:
        ours, theirs = getattr(LocalStore, name, None), getattr(CatalogStore, name)
        assert ours is not None, name
        if callable(theirs):
            assert list(inspect.signature(ours).parameters) == \
                list(inspect.signature(theirs).parameters), name

"""The Milvus store against the embedded one: filters (the same answers, nothing injected
through keys or values), index choices, ids never reused, URIs. Runs on Milvus Lite."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from tests.conftest import STORES, catalog_location
from vestis.catalog import Catalog
from vestis.models import Encoder, create_model

pytest.importorskip("milvus_lite")

from vestis.catalog.milvus import (  # noqa: E402
    MilvusLocation,
    filter_expression,
    milvus_index,
)


@functools.cache
def small_encoder() -> Encoder:
    """A real 8-dimensional encoder (Lite0 with an untrained projection, no download): these
    tests give vectors, never photos, and need only a model identity of that size."""
    torch.manual_seed(0)
    return Encoder(create_model("lite0", pretrained=False, embed_dim=8), backend="torch")


def unit_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


ITEMS = ["a", "a", "b", "c", "d", 'e"] or 1==1 or ["x', "f\\g"]
IMAGE_METADATA = [
    {"colour": "red", "size": 40},
    {"colour": "blue", "size": 40},
    {"colour": "red", "on_sale": True, "price": 9.5},
    {"colour": 'say "hi"', "note": "back\\slash"},
    {"colour": "navy", "tags": ["x", "y"]},
    {"colour": "red", 'a"] or 1==1 or meta["b': "z"},
    {"colour": "gr\u00fcn", "size": 38},
]

FILTERS = [
    {"colour": "red"},
    {"colour": ["red", "navy"]},
    {"colour": []},
    {"colour": "red", "size": "40"},
    {"size": 40},
    {"on_sale": True},
    {"on_sale": "1"},
    {"price": 9.5},
    {"colour": 'say "hi"'},
    {"note": "back\\slash"},
    {"colour": "gr\u00fcn"},
    {"tags": '["x","y"]'},
    {"item_id": "a"},
    {"item_id": ["b", 'e"] or 1==1 or ["x']},
    {"item_id": "f\\g", "colour": "gr\u00fcn"},
    {"no_such_key": "red"},
    # injection attempts: through a value, a key, an item id
    {"colour": 'red" or 1==1 or filt["x'},
    {"colour": "red\" || true || \""},
    {'colour"] == "red" or filt["colour': "zzz"},
    {"item_id": '") or id >= 0 or ("'},
]
#: A key with a quote: the embedded store's JSON path does not find it (a limit of its
#: own); Milvus finds exactly the image that has it, and nothing more.
QUOTED_KEY = {'a"] or 1==1 or meta["b': "z"}


@pytest.fixture
def pair(tmp_path):
    """The same rows in an embedded catalog and a Milvus Lite one."""
    vectors = unit_vectors(len(ITEMS))
    catalogs = []
    for store in ("local", "milvus-lite"):
        catalog = Catalog(catalog_location(store, tmp_path, store), encoder=small_encoder())
        catalog.add_vectors(ITEMS, vectors, model_id=small_encoder().model_id,
                            metadata=IMAGE_METADATA)
        catalogs.append(catalog)
    yield catalogs, vectors
    for catalog in catalogs:
        catalog.close()


def test_filters_keep_the_same_images_in_both_stores(pair):
    (local, milvus), _ = pair
    for where in FILTERS:
        expected = local.image_ids_where(where).tolist()
        assert milvus.image_ids_where(where).tolist() == expected, where
    # sanity: the filters above are not all empty, and injections widened nothing
    assert local.image_ids_where({"colour": "red"}).tolist() == [1, 3, 6]
    assert len(local.image_ids_where({"colour": 'red" or 1==1 or filt["x'})) == 0
    assert milvus.image_ids_where(QUOTED_KEY).tolist() == [6]
    assert milvus.search(pair[1][0], k=10, where=QUOTED_KEY)[0].item_id == ITEMS[5]


def test_updates_and_item_metadata_filter_the_same(pair):
    (local, milvus), vectors = pair
    for catalog in (local, milvus):
        catalog.update("a", {"colour": "green", "season": "winter"})  # item value wins now
        catalog.update("b", {"on_sale": None})
        catalog.add_vectors(["a"], unit_vectors(1, seed=9), model_id=small_encoder().model_id,
                            metadata=[{"size": 42}])
    for where in [*FILTERS, {"colour": "green"}, {"season": "winter"}, {"size": 42},
                  {"season": "winter", "size": "40"}]:
        assert milvus.image_ids_where(where).tolist() == \
            local.image_ids_where(where).tolist(), where
    assert milvus.get("a").metadata == local.get("a").metadata
    found = [(m.item_id, m.image_id, m.metadata) for m in milvus.search(vectors[0], k=3)]
    assert found == [(m.item_id, m.image_id, m.metadata) for m in local.search(vectors[0], k=3)]


def test_search_gives_each_item_once_with_the_embedded_scores(pair):
    (local, milvus), vectors = pair
    for n, vector in enumerate(vectors):
        for where in (None, {"colour": "red"}, {"colour": ["red", "blue"]}):
            ours = milvus.search(vector, k=4, where=where)
            theirs = local.search(vector, k=4, where=where)
            assert [m.item_id for m in ours] == [m.item_id for m in theirs], (n, where)
            assert [m.image_id for m in ours] == [m.image_id for m in theirs]
            assert np.allclose([m.score for m in ours], [m.score for m in theirs], atol=1e-5)
            assert len({m.item_id for m in ours}) == len(ours)


def test_filter_expressions_hold_hex_digests_only():
    """Whatever the keys and values, an expression is one of three shapes of hex digests."""
    import re

    hexa = '"[0-9a-f]+"'
    test = rf"filt\[{hexa}\] == {hexa}"
    clause = rf"(item_key in \[{hexa}(, {hexa})*\]|{test}|\({test}( or {test})+\))"
    for where in [*FILTERS, QUOTED_KEY]:
        expression = filter_expression(where)
        assert expression is None or re.fullmatch(rf"{clause}( and {clause})*", expression), \
            expression


def test_image_ids_are_never_reused(store, tmp_path):
    location = catalog_location(store, tmp_path)
    vectors = unit_vectors(4)
    with Catalog(location, encoder=small_encoder()) as catalog:
        catalog.add_vectors(["a", "b"], vectors[:2], model_id=small_encoder().model_id)
        catalog.remove("b")
    with Catalog(location, encoder=small_encoder()) as catalog:
        catalog.add_vectors(["c"], vectors[2:3], model_id=small_encoder().model_id)
        assert [i.image_id for i in catalog.get("c").images] == [3]
        assert catalog.search(vectors[2], k=1)[0].item_id == "c"


@pytest.mark.parametrize("choice, n, kind", [
    ("auto", 0, "FLAT"), ("auto", 60_000, "HNSW"), ("auto", 6_000_000, "IVF_PQ"),
    ("flat", 10, "FLAT"), ("fp16", 10, "FLAT"), ("hnsw", 10, "HNSW"), ("HNSW32", 10, "HNSW"),
    ("hnsw-fp16", 10, "HNSW"), ("ivfpq", 100_000, "IVF_PQ"), ("IVF1024,PQ95", 10, "IVF_PQ"),
    ("IVF256,SQ8", 10, "IVF_SQ8"), ("ivf_sq8", 100_000, "IVF_SQ8"), ("DISKANN", 10, "DISKANN"),
])
def test_index_choices_map_to_milvus_index_types(choice, n, kind):
    spec = milvus_index(choice, n, 285)
    assert spec["index_type"] == kind
    if kind == "HNSW":
        assert spec["params"]["M"] == 32 and spec["search"] == {"ef": 128}
    if kind == "IVF_PQ":
        assert spec["params"]["m"] == 285 and spec["search"]["nprobe"] >= 8
    if choice == "IVF1024,PQ95":
        assert spec["params"]["nlist"] == 1024
    if kind in ("IVF_PQ", "DISKANN"):  # Milvus Lite builds neither: auto takes IVF_SQ8
        if choice == "auto":
            assert milvus_index(choice, n, 285, lite=True)["index_type"] == "IVF_SQ8"
        else:
            with pytest.raises(ValueError, match="Milvus Lite cannot build"):
                milvus_index(choice, n, 285, lite=True)


def test_an_index_milvus_cannot_build_is_refused_before_anything_is_created(tmp_path):
    with pytest.raises(ValueError, match="no Milvus equivalent"):
        milvus_index("PQ16", 0, 285)
    with pytest.raises(ValueError, match="no Milvus equivalent"):
        Catalog(f"milvus-lite:{tmp_path}/c.db", encoder=small_encoder(), index="PQ16")
    assert not (tmp_path / "c.db").exists()


def test_reindex_moves_between_milvus_index_types(tmp_path):
    vectors = unit_vectors(300, seed=3)
    location = f"milvus-lite:{tmp_path}/c.db"
    with Catalog(location, encoder=small_encoder(), index="hnsw") as catalog:
        catalog.add_vectors([f"i{n}" for n in range(300)], vectors,
                            model_id=small_encoder().model_id)
        assert catalog.factory.startswith("HNSW") and catalog.search_params == "ef=128"
        for choice, kind in [("flat", "FLAT"), ("IVF_FLAT", "IVF_FLAT"), ("IVF_SQ8", "IVF_SQ8")]:
            catalog.rebuild_index(choice)
            assert catalog.factory.startswith(kind) and catalog.index_choice == choice
            assert catalog.search(vectors[7], k=1)[0].item_id == "i7"
        with pytest.raises(ValueError, match="Milvus Lite cannot build"):
            catalog.rebuild_index("ivfpq")  # a server can; Milvus Lite 3 builds no PQ
        assert catalog.factory.startswith("IVF_SQ8")
        assert catalog.search(vectors[9], k=1)[0].item_id == "i9"
        catalog.rebuild_index(search_params="nprobe=16")
        assert catalog.search_params == "nprobe=16"
        assert catalog.measure_recall(queries=20) >= 0.9
        with pytest.raises(ValueError, match="search parameter"):
            catalog.rebuild_index(search_params="bogus")
    with Catalog(location) as reopened:
        assert reopened.factory.startswith("IVF_SQ8") and reopened.search_params == "nprobe=16"
        info = reopened.info()
        assert info["images"] == info["indexed_vectors"] == 300 and info["index_in_sync"]
        with pytest.raises(ValueError, match="rebuild"):
            Catalog(location, index="hnsw")


@pytest.mark.parametrize("uri, remote, name", [
    ("milvus://localhost:19530/shop", "http://localhost:19530", "shop"),
    ("milvus:/localhost:19530/shop", "http://localhost:19530", "shop"),  # through a Path
    ("milvus-lite:cat.db", None, "vestis"),
    ("milvus-lite:cat.db#shop_2", None, "shop_2"),
])
def test_milvus_uris(uri, remote, name):
    location = MilvusLocation(uri)
    assert location.name == name
    if remote:
        assert location.uri == remote and location.file is None
    else:
        assert location.file.name == "cat.db" and location.files_dir.name == "cat.db.files"


@pytest.mark.parametrize("uri", ["milvus://localhost:19530", "milvus://h:1/bad-name",
                                 "milvus-lite:", "milvus-lite:x.db#1abc"])
def test_bad_milvus_uris_are_refused(uri):
    with pytest.raises(ValueError):
        MilvusLocation(uri)


@pytest.mark.parametrize("store", STORES)
def test_a_missing_catalog_is_not_created_by_looking(store, tmp_path):
    from vestis.catalog.stores import store_exists

    location = catalog_location(store, tmp_path)
    assert not store_exists(location)
    assert list(tmp_path.iterdir()) == []


def test_an_auto_milvus_catalog_moves_to_hnsw_when_it_grows(tmp_path, monkeypatch):
    """``auto`` follows the size as in the embedded store (the Flat limit made small here)."""
    import vestis.catalog.index as index

    monkeypatch.setattr(index, "FLAT_LIMIT", 50)
    vectors = unit_vectors(80, seed=4)
    with Catalog(f"milvus-lite:{tmp_path}/c.db", encoder=small_encoder()) as catalog:
        catalog.add_vectors([f"i{n}" for n in range(40)], vectors[:40],
                            model_id=small_encoder().model_id)
        assert catalog.factory == "FLAT"
        catalog.add_vectors([f"i{n}" for n in range(40, 80)], vectors[40:],
                            model_id=small_encoder().model_id)
        assert catalog.index_choice == "auto" and catalog.factory.startswith("HNSW(M=32")
        assert catalog.search(vectors[63], k=1)[0].item_id == "i63"

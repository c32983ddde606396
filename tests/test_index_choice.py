"""Index choices: automatic choice by size, presets, training, rebuilds, tombstones, persistence."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from vestis.catalog import Catalog
from vestis.catalog.catalog import INDEX_NAME
from vestis.catalog.index import (
    FLAT_LIMIT,
    HNSW_LIMIT,
    FaissIndex,
    auto_factory,
    default_search_params,
    exact_top_k,
    ivf_lists,
    pq_bytes,
    recall_at_k,
    resolve_factory,
)
from vestis.cli import app

DIM = 285  # vestis-lite0: 256-d embedding + 29 category probabilities


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres, like embeddings of a few garment kinds."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_choice_follows_catalog_size():
    assert auto_factory(0, DIM) == "Flat"
    assert auto_factory(FLAT_LIMIT - 1, DIM) == "Flat"
    assert auto_factory(FLAT_LIMIT, DIM) == "HNSW32"
    assert auto_factory(HNSW_LIMIT - 1, DIM) == "HNSW32"
    assert auto_factory(HNSW_LIMIT, DIM) == f"IVF{ivf_lists(HNSW_LIMIT)},PQ285"
    assert ivf_lists(1_000_000) == 2048 and ivf_lists(10_000) == 256 and ivf_lists(10) == 1
    assert pq_bytes(285) == 285 and pq_bytes(256) == 256 and pq_bytes(1280) == 320
    assert resolve_factory("ivfpq", 4096, 1031) == "IVF64,SQ8"  # a prime dimension over 512
    assert resolve_factory("hnsw-fp16", 10, DIM) == "HNSW32,SQfp16"
    assert resolve_factory("fp16", 10, DIM) == "SQfp16"
    assert resolve_factory("IVF64,Flat", 10, DIM) == "IVF64,Flat"  # factory strings pass
    assert default_search_params("HNSW32") == "efSearch=128"
    assert default_search_params("IVF2048,PQ285") == "nprobe=64"
    assert default_search_params("Flat") == ""


def test_hnsw_ef_search_survives_save_and_load(tmp_path):
    index = FaissIndex(DIM, "HNSW32", "efSearch=77")
    vectors = clustered(500)
    index.add(np.arange(500), vectors)
    index.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", "HNSW32")
    assert loaded.core.hnsw.efSearch == 77
    overridden = FaissIndex.load(tmp_path / "index.faiss", "HNSW32", "efSearch=300")
    assert overridden.core.hnsw.efSearch == 300
    _, ids = loaded.search(vectors[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_ivfpq_stores_under_600_bytes_per_vector_with_high_recall(tmp_path):
    vectors = clustered(10_000)
    factory = resolve_factory("ivfpq", len(vectors), DIM)
    assert factory == "IVF256,PQ285"
    index = FaissIndex(DIM, factory, default_search_params(factory))
    index.train(vectors)
    index.add(np.arange(len(vectors)), vectors)
    index.save(tmp_path / "index.faiss")
    per_vector = (tmp_path / "index.faiss").stat().st_size / len(vectors)
    assert per_vector <= 600, per_vector
    queries = clustered(100, seed=1)
    _, found = index.search(queries, 10)
    _, exact = exact_top_k(queries, [(np.arange(len(vectors)), vectors)], 10)
    assert recall_at_k(found, exact) >= 0.6  # noisy 285-d clusters: a hard case for PQ
    _, own = index.search(vectors[:200], 10)  # a stored vector finds itself
    assert np.mean([n in row for n, row in enumerate(own)]) >= 0.95


def test_untrained_index_searches_exactly_until_it_can_train():
    vectors = clustered(300)
    index = FaissIndex(DIM, "IVF16,SQ8", "nprobe=4")
    assert index.training_size() == 39 * 16
    index.add(np.arange(300), vectors)
    assert not index.is_trained and len(index) == 300
    scores, ids = index.search(vectors[:3], 5)
    exact_scores, exact_ids = exact_top_k(vectors[:3], [(np.arange(300), vectors)], 5)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    assert index.remove(np.array([0])) == 1 and len(index) == 299
    index.add(np.arange(300, 1000), clustered(700, seed=2))
    assert index.is_trained and len(index) == 999
    _, ids = index.search(vectors[5:6], 1)
    assert ids[0, 0] == 5


def test_hnsw_removal_leaves_tombstones_that_persist(tmp_path):
    vectors = clustered(400)
    index = FaissIndex(DIM, "HNSW32", "efSearch=64")
    index.add(np.arange(400), vectors)
    assert index.remove(np.array([3, 4, 999])) == 2
    assert len(index) == 398 and index.tombstones == 2
    _, ids = index.search(vectors[3:5], 10)
    assert not np.isin(ids, [3, 4]).any()
    index.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", "HNSW32", "efSearch=64")
    assert len(loaded) == 398
    _, ids = loaded.search(vectors[3:5], 10)
    assert not np.isin(ids, [3, 4]).any()


@pytest.fixture(scope="module")
def luma_catalog(tmp_path_factory, luma_subset_csv, encoder):
    path = tmp_path_factory.mktemp("choice")
    with Catalog(path, encoder=encoder) as catalog:
        catalog.add(luma_subset_csv)
        ids = catalog._store.sample_image_ids(1000)
        queries = catalog._store.vectors_by_id(ids)
        before = [[m.item_id for m in row] for row in catalog.search_vectors(queries, k=5)]
    return path, queries, before


def test_new_catalog_records_auto_choice(luma_catalog):
    path, _, _ = luma_catalog
    with Catalog(path) as catalog:
        assert catalog.index_choice == "auto" and catalog.factory == "Flat"
        assert catalog.info(recall_queries=20)["recall@10_vs_flat"] == 1.0
        with pytest.raises(ValueError, match="vestis reindex"):
            Catalog(path, index="HNSW32")
        with pytest.warns(DeprecationWarning, match="index="), \
                pytest.raises(ValueError, match="vestis reindex"):
            Catalog(path, factory="HNSW32")  # the old keyword still works, with a warning


def test_rebuild_changes_index_without_reembedding(luma_catalog):
    path, queries, before = luma_catalog
    with Catalog(path) as catalog:
        catalog.rebuild_index("hnsw")
        assert catalog._encoder is None  # the model was never loaded: nothing re-embedded
        assert catalog.factory == "HNSW32" and catalog.search_params == "efSearch=128"
        after = [[m.item_id for m in row] for row in catalog.search_vectors(queries, k=5)]
        assert after == before
        catalog.rebuild_index(search_params="efSearch=40")
    with Catalog(path) as reopened:  # the parameters are applied again after loading
        assert reopened._vector_index().core.hnsw.efSearch == 40
        assert reopened.info()["index"] == "HNSW32"
        reopened.rebuild_index("flat")
        assert reopened.factory == "Flat"


@pytest.mark.slow
def test_auto_catalog_moves_to_hnsw_when_it_grows(tmp_path, encoder):
    vectors = clustered(FLAT_LIMIT, dim=encoder.dim)  # lite0: 1280-d
    with Catalog(tmp_path / "big", encoder=encoder) as catalog:
        catalog.add_vectors([f"i{n}" for n in range(len(vectors))], vectors,
                            model_id=encoder.model_id)
        assert catalog.index_choice == "auto" and catalog.factory == "HNSW32"
        assert (tmp_path / "big" / INDEX_NAME).exists()
        assert catalog.measure_recall(queries=50) >= 0.95
        matches = catalog.search(vectors[123], k=3)
        assert matches[0].item_id == "i123"
        catalog.remove("i123")
        assert "i123" not in {m.item_id for m in catalog.search(vectors[123], k=3)}


def test_cli_index_choice_reindex_and_recall(tmp_path, luma_subset_csv):
    runner = CliRunner()
    path = tmp_path / "cli"
    result = runner.invoke(app, ["index", str(luma_subset_csv), "--catalog", str(path),
                                 "--index", "hnsw", "--model", "lite0"])
    assert result.exit_code == 0, result.output
    assert "images/s, onnxruntime" in result.output and "index HNSW32" in result.output
    result = runner.invoke(app, ["reindex", "--catalog", str(path), "--index", "fp16"])
    assert result.exit_code == 0 and "index SQfp16" in result.output
    result = runner.invoke(app, ["info", "--catalog", str(path), "--recall", "20"])
    assert "recall@10_vs_flat: 1.0" in result.output and "index_choice: fp16" in result.output
    result = runner.invoke(app, ["reindex", "--catalog", str(path), "--index", "NoSuch99"])
    assert result.exit_code == 2 and "invalid FAISS factory string" in result.output

"""The ONNX Runtime path: export, agreement with torch on real photos, ONNX files as models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vestis.catalog import Catalog
from vestis.cli import app
from vestis.models import DEFAULT_MODEL, Encoder, create_model
from vestis.models.backends import OnnxBackend, physical_cores
from vestis.models.onnx_export import cache_dir, export_onnx, fingerprint


@pytest.fixture(scope="module")
def photos(luma_rows, data_dir) -> list[str]:
    rows = luma_rows[::50][:8]  # eight photos of different products
    return [str(data_dir / "luma" / row["image"]) for row in rows]


@pytest.fixture(scope="module")
def default_model():
    return create_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("onnx") / "vestis-lite0.onnx"
    result = CliRunner().invoke(app, ["export", DEFAULT_MODEL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cosine to torch" in result.output
    return out


def test_default_backend_is_onnxruntime_and_agrees_with_torch(default_model, photos):
    fast = Encoder(default_model)
    eager = Encoder(default_model, backend="torch")
    assert fast.backend_name == "onnxruntime" and eager.backend_name == "torch"
    a, b = fast.embed(photos), eager.embed(photos)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.sum(a * b, axis=1).min() >= 0.999
    assert not np.allclose(a[0], a[1])  # different photos, different vectors


def test_exported_file_embeds_like_the_encoder(exported, default_model, photos):
    from_file = Encoder.from_name(str(exported))
    assert from_file.model is None and from_file.backend_name == "onnxruntime"
    assert from_file.model_id == default_model.model_id
    assert from_file.dim == default_model.output_dim
    assert from_file.preprocess == default_model.preprocess
    expected = Encoder(default_model, backend="torch").embed(photos)
    assert np.sum(from_file.embed(photos) * expected, axis=1).min() >= 0.999


def test_gem_pooled_levels_export(photos):
    model = create_model("lite0", pooling="gem", levels=[2, 4, "head"], embed_dim=64)
    backend = OnnxBackend(export_onnx(model))
    batch = np.stack([model.preprocess(p) for p in photos[:4]])
    expected = Encoder(model, backend="torch").embed_arrays(batch)
    assert np.sum(backend(batch) * expected, axis=1).min() >= 0.999


def same_file(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def test_onnx_file_works_as_a_catalog_model(tmp_path, exported, photos):
    with Catalog(tmp_path / "cat", model=str(exported)) as catalog:
        report = catalog.add(photos[:4])
        assert report.added == 4 and catalog.encoder.backend_name == "onnxruntime"
        assert same_file(catalog.search(photos[2], k=1)[0].path, photos[2])
    with Catalog(tmp_path / "cat") as reopened:  # the stored model name is the file
        assert same_file(reopened.search(photos[3], k=1)[0].path, photos[3])


def test_export_is_cached_by_weights(tmp_path, monkeypatch, photos):
    monkeypatch.setenv("VESTIS_CACHE_DIR", str(tmp_path))
    model = create_model("lite0")
    first = Encoder(model)
    cached = cache_dir() / f"{fingerprint(model)}.onnx"
    assert cached.is_file() and first.backend_name == "onnxruntime"
    stamp = cached.stat().st_mtime_ns
    again = Encoder(model)
    assert cached.stat().st_mtime_ns == stamp  # read back, not exported again
    assert np.allclose(first.embed(photos[:2]), again.embed(photos[:2]), atol=1e-6)


def test_threads_one_stream_per_core(default_model):
    backend = Encoder(default_model).backend
    assert backend.streams == physical_cores() and backend.threads == 1
    pinned = Encoder(default_model, threads=2, streams=1).backend
    assert pinned.streams == 1 and pinned.threads == 2


def test_a_few_photos_are_spread_over_the_streams_with_the_same_vectors(default_model, photos):
    spread = Encoder(default_model, streams=2, threads=1)
    batches = list(spread.iter_batches(photos[:3]))
    assert [len(b.indices) for b in batches] == [2, 1]  # both streams work on a query
    one_batch = Encoder(default_model, streams=1, threads=1).embed(photos[:3])
    assert np.array_equal(np.concatenate([b.vectors for b in batches]), one_batch)
    assert [len(b.indices) for b in spread.iter_batches(photos * 4)] == [16, 16]

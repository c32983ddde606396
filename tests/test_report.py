"""Reports (files, images, JSON) and one end-to-end run of ``evaluate()``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vestis.evaluation import (
    EvalDataset,
    evaluate,
    format_table,
    retrieval_metrics,
    write_report,
)
from vestis.evaluation import report as report_module
from vestis.evaluation.run import embed_dataset
from vestis.records import ImageRecord

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


@pytest.fixture
def small_run(tmp_path):
    """Eight images of four items (one file missing, one box), and random embeddings."""
    samples = []
    for i in range(8):
        path = tmp_path / "images" / f"{i}.png"
        if i != 5:  # image 5 is missing: the report must draw a placeholder
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (40 + 5 * i, 60), COLOURS[i % 4]).save(path)
        samples.append(ImageRecord(path, f"item{i % 4}", (2, 2, 30, 40) if i == 3 else None))
    dataset = EvalDataset("tiny", samples, samples, np.arange(8), "leave-one-out")
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((8, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    result = retrieval_metrics(
        embeddings,
        dataset.query_ids,
        embeddings,
        dataset.gallery_ids,
        query_gallery_index=dataset.query_gallery_index,
    )
    return result, dataset


def test_write_report_creates_all_files(small_run, tmp_path):
    result, dataset = small_run
    out_dir = tmp_path / "report"
    report = write_report(result, dataset, out_dir, model_name="random-16", extra={"seed": 0})

    assert report == out_dir / "report.md"
    text = report.read_text()
    for expected in ("tiny", "leave-one-out", "random-16", "| R@1 |", "| mAP |", "| seed | 0 |"):
        assert expected in text
    assert "](recall_at_k.png)" in text and "](worst_queries.png)" in text
    for name in ("recall_at_k.png", "worst_queries.png"):
        with Image.open(out_dir / name) as image:
            image.verify()
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_metrics_json_holds_plain_numbers(small_run, tmp_path):
    result, dataset = small_run
    write_report(result, dataset, tmp_path, model_name="m")
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["dataset"] == "tiny" and payload["model"] == "m"
    assert payload["metrics"] == pytest.approx(result.metrics)
    assert isinstance(payload["metrics"]["n_queries"], int)
    assert len(payload["recall_at_k"]) == 50
    assert all(isinstance(value, float) for value in payload["recall_at_k"])


def test_worst_queries_grid_borders_mark_correct_results(small_run, tmp_path):
    result, dataset = small_run
    path = report_module.plot_worst_queries(result, dataset, tmp_path / "w.png", n_rows=3)
    tile_w = report_module.THUMBNAIL + 2 * report_module.BORDER
    tile_h = tile_w + report_module.CAPTION
    rows = report_module.worst_query_rows(result, 3)
    with Image.open(path) as sheet:
        assert sheet.size == (tile_w * 6 + report_module.GAP, tile_h * 3)
        for row_number, row in enumerate(rows):
            query = dataset.queries[result.query_indices[row]]
            y = row_number * tile_h + 1
            assert sheet.getpixel((1, y)) == report_module.QUERY
            for rank, gallery_index in enumerate(result.top_indices[row][:5], start=1):
                correct = dataset.gallery[gallery_index].item_id == query.item_id
                colour = report_module.CORRECT if correct else report_module.WRONG
                assert sheet.getpixel((report_module.GAP + rank * tile_w + 1, y)) == colour


def test_worst_queries_are_sorted_by_ap_then_rank(small_run):
    result, _ = small_run
    rows = report_module.worst_query_rows(result, len(result.average_precision))
    keys = [(result.average_precision[r], -result.first_positive_rank[r]) for r in rows]
    assert keys == sorted(keys)


def test_missing_image_becomes_a_grey_placeholder(tmp_path):
    thumbnail = report_module._thumbnail(ImageRecord(tmp_path / "absent.jpg", "x"))
    assert thumbnail.getpixel((10, 10)) == report_module.PLACEHOLDER


def test_format_table():
    table = format_table({"R@1": 0.5, "mAP": 0.123456, "n_queries": 12})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split() == ["R@1", "0.5000"]
    assert lines[3].split() == ["mAP", "0.1235"]
    assert lines[4].split() == ["n_queries", "12"]


def luma_subset(tmp_path: Path, n_rows: int = 40) -> Path:
    catalog = DATA_DIR / "luma" / "catalog.csv"
    if not catalog.exists():
        pytest.skip(f"shared data not available: {catalog}")
    with catalog.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:n_rows]
    subset = tmp_path / "luma_subset.csv"
    with subset.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "item_id"])
        writer.writerows([catalog.parent / row["image"], row["item_id"]] for row in rows)
    return subset


def test_evaluate_end_to_end_on_luma_subset(tmp_path, data_dir):
    pytest.importorskip("vestis.models")
    subset = luma_subset(tmp_path)
    json_path = tmp_path / "out" / "metrics.json"
    result = evaluate(
        subset, "lite0", progress=False, json_path=json_path, report_dir=tmp_path / "report"
    )
    rates = {key: value for key, value in result.metrics.items() if not key.startswith("n_")}
    assert rates and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rates.values())
    assert result.metrics["n_gallery"] == 40
    assert result.metrics["n_queries"] + result.metrics["n_queries_skipped"] > 0
    payload = json.loads(json_path.read_text())
    assert payload["model"] == "lite0"
    assert payload["metrics"]["n_gallery"] == 40
    assert (tmp_path / "report" / "report.md").exists()


class CountingEncoder:
    """Stands in for ``vestis.models.Encoder``: one-hot vectors, and a record of each call."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def embed(self, paths, boxes=None, *, progress=False):
        self.calls.append((list(paths), boxes))
        return np.eye(len(paths), 16, dtype=np.float32)


def test_embed_dataset_embeds_each_image_and_box_once():
    a, b = ImageRecord(Path("/a.jpg"), "x"), ImageRecord(Path("/b.jpg"), "x")
    boxed = ImageRecord(Path("/a.jpg"), "y", (1, 2, 3, 4))
    leave_one_out = EvalDataset("loo", [a, b], [a, b, boxed], np.array([0, 1]), "leave-one-out")
    encoder = CountingEncoder()
    queries, gallery = embed_dataset(encoder, leave_one_out)
    assert encoder.calls == [([a.path, b.path, a.path], [None, None, (1, 2, 3, 4)])]
    np.testing.assert_array_equal(queries, gallery[:2])

    query_gallery = EvalDataset("qg", [a], [b, b], None, "query-gallery")
    encoder = CountingEncoder()
    queries, gallery = embed_dataset(encoder, query_gallery)
    assert encoder.calls == [([b.path, a.path], None)]  # no box anywhere: boxes=None
    np.testing.assert_array_equal(gallery[0], gallery[1])
    assert not np.array_equal(queries[0], gallery[0])

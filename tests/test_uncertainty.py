"""Bootstrap intervals, paired comparisons, and their place in ``vestis eval``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vestis.cli import app
from vestis.evaluation import bootstrap_intervals, compare_results, retrieval_metrics
from vestis.records import ImageRecord
from vestis.train.sources import ValidationSet
from vestis.train.trainer import split_metrics


def test_interval_of_a_coin_matches_the_normal_approximation():
    values = np.tile([0.0, 1.0], 200)  # 400 queries, half right
    low, high = bootstrap_intervals({"R@1": values})["R@1"]
    half_width = 1.96 * np.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half_width, abs=0.012)
    assert high == pytest.approx(0.5 + half_width, abs=0.012)


def test_constant_values_give_a_point_interval_and_seeds_reproduce():
    assert bootstrap_intervals({"mAP": np.full(30, 0.7)})["mAP"] == pytest.approx((0.7, 0.7))
    values = {"R@1": np.random.default_rng(1).random(50)}
    assert bootstrap_intervals(values, seed=3) == bootstrap_intervals(values, seed=3)


def test_groups_resample_correlated_queries_together():
    """Two views of one item that always agree carry the information of one query: the
    grouped interval is wider by about sqrt(2)."""
    per_item = np.tile([0.0, 1.0], 100)
    values = {"R@1": np.repeat(per_item, 2)}
    items = np.repeat(np.arange(200), 2)
    single = np.diff(bootstrap_intervals(values)["R@1"])[0]
    grouped = np.diff(bootstrap_intervals(values, groups=list(items))["R@1"])[0]
    assert grouped / single == pytest.approx(np.sqrt(2), rel=0.15)


def problem(seed: int, noise: float):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, 16))
    labels = np.repeat(np.arange(40), 3)
    vectors = centres[labels] + noise * rng.standard_normal((120, 16))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), list(labels)


def leave_one_out(vectors, labels):
    return retrieval_metrics(vectors, labels, vectors, labels,
                             query_gallery_index=np.arange(len(labels)))


def test_a_model_against_itself_differs_by_nothing():
    vectors, labels = problem(0, noise=1.5)
    result = leave_one_out(vectors, labels)
    comparison = compare_results(result, result, labels)
    assert all(value == 0 for value in comparison.difference.values())
    assert not comparison.significant("R@1")
    assert len(comparison.only_a) == len(comparison.only_b) == 0


def test_a_clearly_better_model_wins_beyond_the_noise():
    clean, labels = problem(0, noise=0.6)
    noisy, _ = problem(0, noise=2.5)
    good, bad = leave_one_out(clean, labels), leave_one_out(noisy, labels)
    comparison = compare_results(good, bad, labels)
    assert comparison.difference["R@1"] == pytest.approx(
        good.metrics["R@1"] - bad.metrics["R@1"])
    assert comparison.significant("R@1") and comparison.significant("mAP")
    low, high = comparison.intervals["mAP"]
    assert 0 < low <= comparison.difference["mAP"] <= high
    right_good, right_bad = good.hit_probability(1) > 0.5, bad.hit_probability(1) > 0.5
    np.testing.assert_array_equal(comparison.only_a, np.flatnonzero(right_good & ~right_bad))
    assert len(comparison.only_a) > len(comparison.only_b)


def test_results_on_other_queries_are_refused():
    vectors, labels = problem(0, noise=1.0)
    whole = leave_one_out(vectors, labels)
    part = leave_one_out(vectors[:60], labels[:60])
    with pytest.raises(ValueError, match="same queries"):
        compare_results(whole, part)


def test_trainer_selects_on_the_fair_metric():
    """A collapsed model must not look perfect to the trainer's choice of best.pt."""
    samples = [ImageRecord(Path(f"{i}.jpg"), f"item{i // 2}") for i in range(20)]
    metrics = split_metrics(np.ones((20, 4), np.float32) / 2, ValidationSet("luma", samples))
    assert metrics["luma_R@1"] == pytest.approx(1 / 19)
    assert metrics["luma_mAP"] < 0.2


@pytest.fixture
def two_item_csv(tmp_path: Path) -> Path:
    """Six photos of three items, each item a different plain colour with small changes."""
    from PIL import Image

    rows = []
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for item, colour in enumerate(colours):
        for view in range(2):
            path = tmp_path / f"{item}-{view}.png"
            shade = tuple(min(255, c + 15 * view) for c in colour)
            Image.new("RGB", (64, 80), shade).save(path)
            rows.append((path.name, f"item{item}"))
    catalog = tmp_path / "catalog.csv"
    with catalog.open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "item_id"), *rows])
    return catalog


def test_cli_eval_prints_intervals_and_compares_two_models(two_item_csv, tmp_path):
    runner = CliRunner()
    single = runner.invoke(app, ["eval", str(two_item_csv), "--model", "lite0",
                                 "--json", str(tmp_path / "m.json")])
    assert single.exit_code == 0, single.output
    assert "95% CI" in single.output and "R-precision" in single.output
    payload = json.loads((tmp_path / "m.json").read_text())
    low, high = payload["intervals"]["mAP"]
    assert low <= payload["metrics"]["mAP"] <= high

    both = runner.invoke(app, ["eval", str(two_item_csv), "--model", "lite0", "--compare",
                               "lite1", "--report", str(tmp_path / "cmp")])
    assert both.exit_code == 0, both.output
    assert "lite0" in both.output and "lite1" in both.output and "difference" in both.output
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert report["models"] == ["lite0", "lite1"]
    assert report["n_queries"] == 6
    assert set(report["difference_intervals"]) >= {"R@1", "mAP", "MAP@R", "R-precision"}
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith("# lite0 against lite1")

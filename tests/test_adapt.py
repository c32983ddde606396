"""``vestis adapt``: a shop's own items teach the map; it refuses to ship one that does not
help; the written checkpoint is a model name like any other."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_luma_subset
from vestis.cli import app
from vestis.models import Encoder
from vestis.train.adapt import adapt, fit_map


def test_adapting_imagenet_features_to_a_shop_separates_its_unseen_items(
        luma_rows, data_dir, tmp_path):
    """ImageNet Lite0 confuses the views of Luma's items; the map learnt on some products
    must make products it never saw easier to tell apart."""
    source = write_luma_subset(luma_rows, data_dir, tmp_path / "shop.csv", n_products=24)
    out = tmp_path / "shop.pt"
    report = adapt(source, out, base="lite0", holdout=0.4, views=2, progress=False)
    assert report.kept
    assert report.held_out_items >= 8
    assert report.adapted_metrics["R@1"] > report.base_metrics["R@1"] + 0.05
    assert report.adapted_metrics["mAP"] > report.base_metrics["mAP"]

    # The checkpoint is a model: the base's vectors through the saved map.
    photos = [line.split(",")[0] for line in source.read_text().splitlines()[1:4]]
    base = Encoder.from_name("lite0", backend="torch").embed(photos)
    adapted = Encoder.from_name(str(out), backend="torch").embed(photos)
    weight = torch.load(out, weights_only=True)["state_dict"]["transform.weight"].float()
    expected = torch.nn.functional.normalize(torch.from_numpy(base) @ weight.T, dim=1)
    np.testing.assert_allclose(adapted, expected.numpy(), atol=1e-4)
    assert not np.allclose(adapted, base, atol=1e-3)


def separable_shop(folder: Path, n_items: int = 10) -> Path:
    """Items a plain model already tells apart: each a distinct colour, two photos each."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in range(n_items):
        colour = rng.integers(0, 256, 3)
        for photo in range(2):
            pixels = np.clip(colour + rng.normal(0, 3, (64, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{item}-{photo}.png")
            rows.append((f"{item}-{photo}.png", f"item{item}"))
    with (folder / "catalog.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "item_id"), *rows])
    return folder / "catalog.csv"


def test_adapt_refuses_when_it_does_not_help_and_keeps_the_base(tmp_path):
    source = separable_shop(tmp_path / "shop")
    out = tmp_path / "shop.pt"
    result = CliRunner().invoke(app, ["adapt", str(source), "--out", str(out), "--model",
                                      "lite0", "--holdout", "0.5"])
    assert result.exit_code == 0, result.output
    assert "did not help" in result.output
    meta = torch.load(out, weights_only=True)["meta"]["adapt"]
    assert meta["kept"] is False and meta["base_metrics"]["R@1"] == 1.0
    photos = sorted(str(path) for path in source.parent.glob("*.png"))[:4]
    base = Encoder.from_name("lite0", backend="torch").embed(photos)
    unchanged = Encoder.from_name(str(out), backend="torch").embed(photos)
    np.testing.assert_allclose(unchanged, base, atol=1e-5)


def test_adapt_needs_enough_multi_photo_items_and_known_settings(tmp_path):
    source = separable_shop(tmp_path / "tiny", n_items=5)
    with pytest.raises(ValueError, match="at least 8 items"):
        adapt(source, tmp_path / "x.pt", base="lite0", progress=False)
    with pytest.raises(ValueError, match="unknown adapt setting"):
        adapt(source, tmp_path / "x.pt", base="lite0", progress=False, epochs=3)
    assert not (tmp_path / "x.pt").exists()


def test_the_map_shrinks_what_varies_within_items():
    """Vectors whose items differ along axis 0 and whose views differ along axis 1: the
    whitening keeps axis 0 and shrinks axis 1; shrinkage 1 is the identity."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 5)
    vectors = np.zeros((100, 2))
    vectors[:, 0] = rng.normal(0, 1, 20)[labels] + rng.normal(0, 0.05, 100)
    vectors[:, 1] = rng.normal(0, 1, 100)
    weight = fit_map(torch.from_numpy(vectors), torch.from_numpy(labels), 0.1).numpy()
    assert abs(weight[0, 0]) > 2 * abs(weight[1, 1])
    identity = fit_map(torch.from_numpy(vectors), torch.from_numpy(labels), 1.0).numpy()
    np.testing.assert_allclose(identity, np.eye(2), atol=1e-9)

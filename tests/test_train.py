"""``vestis train`` end to end on a smoke budget, for every method recipe."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from vestis.models import Encoder
from vestis.train import load_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE = {
    "data": {"max_images": 48},
    "cache": {"views": 2, "dir": None},
    "sampler": {"p": 4, "k": 2},
    "epochs": 2,
    "time_budget_minutes": 2,
}


def read_log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("recipe", ["triplet", "os_is", "htl"])
def test_each_recipe_trains_end_to_end_on_a_smoke_budget(recipe, tmp_path, data_dir):
    result = train(CONFIGS / f"{recipe}.yaml", tmp_path, overrides=SMOKE, progress=False)
    assert result.epochs_run == 2
    for name in ("best.pt", "last.pt", "config.yaml", "log.csv"):
        assert (tmp_path / name).exists(), name
    rows = read_log(tmp_path)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(np.isfinite(float(row["loss"])) for row in rows)
    assert "luma_R@1" in rows[0] and "clothing_R@1" in rows[0]
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["loss"]["name"] == recipe and resolved["epochs"] == 2

    # The checkpoint is a model everywhere a name is.
    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    image = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    vector = encoder.embed_one(image)
    assert vector.shape == (256,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    assert (tmp_path / "best.pt").stat().st_size < 10 * 2**20


def test_runs_are_reproducible_from_the_seed_and_resumable(tmp_path, data_dir):
    first = train(CONFIGS / "triplet.yaml", tmp_path / "a", overrides=SMOKE, progress=False)
    second = train(CONFIGS / "triplet.yaml", tmp_path / "b", overrides=SMOKE, progress=False)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]

    one_epoch = {**SMOKE, "epochs": 1}
    train(CONFIGS / "triplet.yaml", tmp_path / "c", overrides=one_epoch, progress=False)
    resumed = train(CONFIGS / "triplet.yaml", tmp_path / "c", resume=True, overrides=SMOKE,
                    progress=False)
    assert [row["epoch"] for row in read_log(tmp_path / "c")] == ["1", "2"]
    assert resumed.history[-1]["epoch"] == 2


def test_bad_recipes_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="sources"):
        load_config({"data": {"sources": []}})
    with pytest.raises(ValueError, match="kind"):
        load_config({"data": {"sources": [{"kind": "imagenet", "path": "."}]}})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")

"""``vestis train`` end to end on a smoke budget, for every method recipe."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.smoke import CONFIGS, SMOKE
from vestis.models import Encoder, create_model
from vestis.train import load_config, train
from vestis.train.sources import build_sources

pytestmark = pytest.mark.train


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


def test_folds_share_each_images_cached_views(tmp_path, data_dir):
    """Views depend on the image, not on its place in a sample list: a second fold reuses
    the views the first cached and extracts only its own new images."""
    from vestis.data.datasets import ImageDataset
    from vestis.train.trainer import CachedFeatures

    config = load_config(CONFIGS / "triplet.yaml", {**SMOKE, "cache": {"views": 3}})
    samples, _ = build_sources(load_config(CONFIGS / "triplet.yaml", SMOKE))
    model = create_model("lite0").eval()
    first, second = samples[:6], samples[3:6][::-1] + samples[6:8]

    def cached(images, folder):
        run = {**config, "cache": {**config["cache"], "dir": folder}}
        return CachedFeatures(model, ImageDataset(images), run, torch.device("cpu"),
                              progress=False).cache["features"]

    shared = tmp_path / "cache"
    one = cached(first, str(shared))
    written = {path: path.stat().st_mtime_ns for path in shared.rglob("*.pt")}
    two = cached(second, str(shared))
    assert len(written) == 6 and len(list(shared.rglob("*.pt"))) == 8
    assert all(path.stat().st_mtime_ns == when for path, when in written.items())
    assert torch.equal(two[:, :3], one[:, 3:6].flip(1))
    assert torch.equal(cached(second, None), two)  # the same views without a cache folder
    assert not torch.equal(one[1], one[2])  # views differ from each other


def test_bad_recipes_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="sources"):
        load_config({"data": {"sources": []}})
    with pytest.raises(ValueError, match="kind"):
        load_config({"data": {"sources": [{"kind": "imagenet", "path": "."}]}})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="'margn'.*it takes: margin, mining"):
        load_config(CONFIGS / "triplet.yaml", {"loss": {"margn": 0.3}})
    with pytest.raises(ValueError, match="loss 'htl' has no parameter 'margin'"):
        load_config(CONFIGS / "htl.yaml", {"loss": {"margin": 0.3}})
    with pytest.raises(ValueError, match="unknown sampler key.*kk"):
        load_config(CONFIGS / "triplet.yaml", {"sampler": {"kk": 4}})
    with pytest.raises(ValueError, match=r"unknown recipe key.*: epoch$"):
        load_config(CONFIGS / "triplet.yaml", {"epoch": 4})
    with pytest.raises(ValueError, match="unknown data source key.*spilt_by"):
        load_config({"data": {"sources": [{"kind": "luma", "path": ".", "spilt_by": "x"}]}})
    with pytest.raises(ValueError, match="data.folds"):
        load_config(CONFIGS / "triplet.yaml", {"data": {"folds": 1}})
    with pytest.raises(ValueError, match="data.fold must"):
        load_config(CONFIGS / "triplet.yaml", {"data": {"folds": 5, "fold": 5}})


def test_k_fold_recipes_hold_out_every_luma_product_once(data_dir):
    held_out = []
    for fold in range(3):
        config = load_config(CONFIGS / "triplet.yaml", {"data": {"folds": 3, "fold": fold}})
        train_samples, validation = build_sources(config)
        luma = next(split for split in validation if split.name == "luma")
        products = {sample.group for sample in luma.samples}
        trained = {s.group.split(":", 1)[1] for s in train_samples
                   if s.group and s.group.startswith("luma:")}
        assert trained and not products & trained
        held_out += [sample.path for sample in luma.samples]
    assert len(held_out) == len(set(held_out)) == 413


def test_fine_tuning_upper_stages_trains_and_ships_only_them(tmp_path, data_dir):
    smoke = {**SMOKE, "epochs": 1, "model": {"finetune_from_stage": 6, "category_weight": 1.0}}
    train(CONFIGS / "triplet.yaml", tmp_path, overrides=smoke, progress=False)
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    backbone = {k for k in payload["state_dict"] if k.startswith("backbone.")}
    pretrained = create_model("lite0").backbone.state_dict()
    last_stage = create_model("lite0").backbone.stage_ends[5] + 1
    assert payload["includes_backbone"] == "partial"
    assert f"backbone._blocks.{last_stage}._project_conv.weight" in backbone
    assert "backbone._conv_head.weight" in backbone
    assert not any(k.startswith(("backbone._blocks.0.", "backbone._conv_stem")) for k in backbone)
    changed = [k for k in backbone if k.endswith("weight")
               and not torch.equal(payload["state_dict"][k], pretrained[k[len("backbone."):]])]
    assert changed, "the fine-tuned stage did not move"
    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    vector = encoder.embed_one(data_dir / "luma" / "images" / "mh06-blue_main.jpg")
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_a_run_can_start_from_another_runs_checkpoint(tmp_path, data_dir):
    from vestis.train.trainer import init_from_checkpoint

    train(CONFIGS / "triplet.yaml", tmp_path / "first", overrides=SMOKE, progress=False)
    start = torch.load(tmp_path / "first" / "best.pt", weights_only=True)["state_dict"]
    model = create_model("lite0", levels=[2, 3, 4, "head"], adapter_dim=512, embed_dim=256)
    loaded = init_from_checkpoint(model, tmp_path / "first" / "best.pt")
    assert any(k.startswith("projection") for k in loaded)
    key = next(k for k in loaded if not k.startswith("backbone."))
    assert torch.equal(model.state_dict()[key], start[key].float())
    other = create_model("lite0", embed_dim=32)  # another head: nothing matches it
    with pytest.raises(ValueError, match="no weights match"):
        init_from_checkpoint(other, tmp_path / "first" / "best.pt")
    second = {**SMOKE, "epochs": 1, "model": {"init_from": str(tmp_path / "first" / "best.pt")}}
    train(CONFIGS / "triplet.yaml", tmp_path / "second", overrides=second, progress=False)
    assert read_log(tmp_path / "second")


def test_validation_only_sources_are_scored_but_never_trained_on(tmp_path, data_dir):
    from vestis.train.sources import build_sources

    config = load_config(CONFIGS / "triplet.yaml", {
        "data": {"sources": [
            {"name": "luma", "kind": "luma", "path": str(data_dir / "luma" / "catalog.csv"),
             "split_by": "product", "val_fraction": 0.2},
            {"name": "clothing", "kind": "clothing",
             "path": str(data_dir / "clothing" / "labels.csv"), "split_by": "sender_id",
             "val_fraction": 0.2, "validation_only": True}]}})
    samples, validation = build_sources(config)
    assert {s.item_id.split(":")[0] for s in samples} == {"luma"}
    assert [v.name for v in validation] == ["luma", "clothing"]
    with pytest.raises(ValueError, match="nothing to train"):
        load_config({"data": {"sources": [{"kind": "luma", "path": ".", "split_by": "product",
                                           "validation_only": True}]}})


def test_test_size_embeds_validation_and_the_saved_model_larger_than_training_views(
        tmp_path, data_dir):
    from vestis.train.trainer import Trainer

    smoke = {**SMOKE, "epochs": 1,
             "model": {"finetune_from_stage": 6, "category_weight": 1.0, "test_size": 256}}
    train(CONFIGS / "triplet.yaml", tmp_path / "run", overrides=smoke, progress=False)
    assert create_model(tmp_path / "run" / "last.pt").preprocess.size == 256

    trainer = Trainer(load_config(CONFIGS / "triplet.yaml", smoke), tmp_path / "t",
                      torch.device("cpu"), progress=False)
    # Stage 6 starts on stage 5's output, a stride-32 map: 7 cells at 224 px, 8 at 256 px.
    assert trainer.features.cache["entry"].shape[-1] == 7
    validation = trainer.validation[0]
    vectors = trainer.features.validation_features(validation)
    assert trainer.features._validation_cache[validation.name]["entry"].shape[-1] == 8
    assert len(vectors) == len(validation.samples)

    with pytest.raises(ValueError, match="test_size"):
        load_config(CONFIGS / "triplet.yaml", {"model": {"test_size": 16}})


def test_imagenet_distillation_is_logged_and_needs_cached_stages(tmp_path, data_dir):
    smoke = {**SMOKE, "epochs": 1,
             "model": {"finetune_from_stage": 6, "imagenet_distill": 1.0}}
    train(CONFIGS / "triplet.yaml", tmp_path / "run", overrides=smoke, progress=False)
    values = [float(row["imagenet_distill"]) for row in read_log(tmp_path / "run")]
    assert values and all(0 < value < 4 for value in values)
    no_cut = {**SMOKE, "epochs": 1, "model": {"imagenet_distill": 1.0}}
    with pytest.raises(ValueError, match="imagenet_distill needs finetune_from_stage"):
        train(CONFIGS / "triplet.yaml", tmp_path / "bad", overrides=no_cut, progress=False)


def test_a_recipes_imagenet_weight_changes_no_training_step_and_blends_the_saved_model(
        tmp_path, data_dir):
    base = {**SMOKE, "epochs": 1, "model": {"finetune_from_stage": 6}}
    blended = {**base, "model": {**base["model"], "imagenet_weight": 0.5,
                                 "imagenet_from_stage": 6}}
    for name, overrides in (("plain", base), ("blended", blended)):
        train(CONFIGS / "triplet.yaml", tmp_path / name, overrides=overrides, progress=False)
    # Same losses and validation scores: training and its validation use the trained vector.
    def scores(run: str) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_log(run)]

    assert scores(tmp_path / "plain") == scores(tmp_path / "blended")
    photos = [data_dir / "luma" / "images" / f"mh06-{c}_main.jpg" for c in ("blue", "black")]
    plain = Encoder.from_name(str(tmp_path / "plain" / "last.pt")).embed(photos)
    mixed = Encoder.from_name(str(tmp_path / "blended" / "last.pt")).embed(photos)
    assert plain.shape == (2, 256) and mixed.shape == (2, 256 + 1280)
    # The saved model's trained part is the plain run's vector, at weight 1 - 0.5.
    assert np.allclose(mixed[:, 1280:], plain * 0.5 ** 0.5, atol=1e-4)

"""Impdrop: the fusion, the two branches, the recipe and ``vestis explain``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import require_data
from tests.smoke import CONFIGS, smoke
from vestis.explain import overlay
from vestis.models import Encoder, create_model
from vestis.models.impdrop import expected_impdrop, impdrop
from vestis.train import load_config, train
from vestis.train.attention_pretrain import (
    cell_targets,
    fit_attention,
    letterbox_mask,
    mask_agreement,
    masked_maps,
    pretrain_spec,
)
from vestis.train.trainer import Trainer

VESTIS = str(Path(sys.executable).with_name("vestis"))
SMOKE = smoke(max_images=32, batches_per_epoch=3)
PHOTO = "mh06-blue_main.jpg"


def two_level_attention(size: int = 16) -> torch.Tensor:
    """Attention 0.1 on the left half, 0.9 on the right half, for 64 images."""
    attention = torch.full((64, 1, size, size), 0.1)
    attention[..., size // 2:] = 0.9
    return attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("impdrop_net", pooling="gem").eval()


@pytest.fixture(scope="module")
def impdrop_run(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("impdrop")
    pretrain = {"attention_pretrain": {"max_images": 6, "epochs": 3}}
    train(CONFIGS / "impdrop.yaml", run, overrides={**SMOKE, "model": pretrain}, progress=False)
    return run


# -- the fusion ------------------------------------------------------------------------------
def test_at_evaluation_impdrop_weights_the_map_by_the_attention_as_training_does_on_average():
    torch.manual_seed(0)
    features = torch.rand(64, 8, 16, 16) + 0.5
    attention = two_level_attention()
    evaluated = impdrop(features, attention, training=False)
    assert not torch.allclose(evaluated, features)  # the attention reaches inference
    assert torch.allclose(evaluated, features * attention * 256 / attention[0].sum())
    assert torch.allclose(evaluated, expected_impdrop(features, attention))
    trained = torch.stack([impdrop(features, attention, training=True) for _ in range(200)])
    per_column = trained.mean(dim=(0, 1, 2, 3)), evaluated.mean(dim=(0, 1, 2))
    assert torch.allclose(*per_column, rtol=0.03)  # the mean of the sampled masks
    flat = torch.full_like(attention, 0.3)  # a flat attention changes nothing
    assert torch.allclose(impdrop(features, flat, training=False), features, atol=1e-6)


def test_impdrop_keeps_each_position_with_the_attentions_probability():
    torch.manual_seed(0)
    features = torch.rand(64, 8, 16, 16) + 0.5  # no zeros of its own
    fused = impdrop(features, two_level_attention(), training=True)
    kept = fused != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept))  # one mask for all channels
    keep_rate = kept[:, 0].float().mean(dim=(0, 1))  # per column
    assert keep_rate[:8].mean().item() == pytest.approx(0.1, abs=0.02)
    assert keep_rate[8:].mean().item() == pytest.approx(0.9, abs=0.02)
    # kept positions are the features scaled by (positions / kept positions) of their image
    scale = 256 / kept[:, 0].flatten(1).sum(dim=1)
    assert torch.allclose(fused, features * kept * scale.view(-1, 1, 1, 1))


def test_the_attention_learns_through_the_sampled_mask():
    """Straight-through: the gradient reaches the attention as if the mask were the attention."""
    torch.manual_seed(0)
    features = torch.rand(64, 8, 16, 16)
    attention = two_level_attention().requires_grad_()
    weights = torch.randn(8, 16, 16)
    torch.manual_seed(1)
    fused = impdrop(features, attention, training=True)
    (gradient,) = torch.autograd.grad((fused * weights).sum(), attention)
    torch.manual_seed(1)
    kept = torch.bernoulli(attention.detach())
    scale = (256 / kept.flatten(1).sum(dim=1)).view(-1, 1, 1, 1)
    expected = (features * weights * scale).sum(dim=1, keepdim=True)
    assert torch.allclose(gradient, expected, rtol=1e-4, atol=1e-5)


# -- the network -----------------------------------------------------------------------------
def test_the_higher_layers_see_the_low_level_map_dropped_by_the_attention():
    torch.manual_seed(0)
    model = create_model("impdrop_net").eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        entry, global_features = model.extract_lower(images, 3)
        model.attention.out.weight.zero_()
        model.attention.out.bias.zero_()  # keep probability 0.5 everywhere
        seen = []
        hook = model.branch.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        model.train()
        model.backbone.eval()  # as the trainer runs it
        model.extract_upper(entry, global_features, 3)
        model.eval()
        model.extract_upper(entry, global_features, 3)
        hook.remove()
    assert entry.shape == (2, 40, 28, 28)  # low level: the map entering stage 3
    trained, evaluated = seen
    kept = trained != 0
    assert 0.3 < kept.float().mean() < 0.7
    scale = 784 / kept[:, 0].flatten(1).sum(dim=1)
    assert torch.allclose(trained, entry * kept * scale.view(-1, 1, 1, 1), atol=1e-6)
    assert torch.equal(evaluated, entry)


def test_the_search_vector_follows_the_attention():
    """At inference the branch sees the map weighted by the attention (not the plain map), so
    another attention gives another search vector."""
    torch.manual_seed(0)
    model = create_model("impdrop_net").eval()
    images = torch.randn(2, 3, 224, 224)
    seen = []
    hook = model.branch.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        entry = model.low_level_map(images)
        before = model(images)
        attention = model.attention(entry)
        model.attention.out.weight.normal_(0.0, 1.0)  # another, sharper attention
        after = model(images)
    hook.remove()
    assert attention.std() > 0.001
    assert torch.allclose(seen[0], expected_impdrop(entry, attention), atol=1e-5)
    assert not torch.allclose(seen[0], entry, atol=1e-3)
    assert (before - after).norm(dim=1).min() > 0.01


def test_the_global_branch_is_the_frozen_network_and_extract_is_upper_on_lower(model):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    plain = create_model("retrieval_net", levels=[2, 3, 4, "head"], pooling="gem").eval()
    with torch.no_grad():
        whole = model.extract(images)
        parts = model.extract_upper(*model.extract_lower(images, 3), 3)
        vectors = model(images)
        global_features = plain.extract(images)
        entry = model.extract_lower(images, 3)[0]
        attention_part = model.attention_branch(expected_impdrop(entry, model.attention(entry)))
    assert torch.allclose(whole, parts, atol=1e-5)
    assert torch.allclose(whole[:, :model.global_dim], global_features, atol=1e-4)
    assert torch.allclose(whole[:, model.global_dim:], attention_part, atol=1e-5)
    assert vectors.shape == (2, 256)
    maps = model.attention_maps(images)
    assert maps.shape == (2, 1, 28, 28) and 0 <= maps.min() and maps.max() <= 1


def test_the_recipe_must_cache_the_low_level_map(tmp_path, data_dir):
    with pytest.raises(ValueError, match="finetune_from_stage: 3"):
        Trainer(load_config(CONFIGS / "impdrop.yaml", {**SMOKE, "model": {
            "finetune_from_stage": 5}}), tmp_path, torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="branch_stages"):
        create_model("impdrop_net", pretrained=False, attend_at_stage=5, branch_stages=3)


def test_only_the_branch_copy_is_fine_tuned_and_at_the_backbone_rate(tmp_path, data_dir):
    tiny = {"data": {"max_images": 8}, "cache": {"views": 1, "dir": None},
            "sampler": {"p": 2, "k": 2}, "epochs": 1}
    trainer = Trainer(load_config(CONFIGS / "impdrop.yaml", tiny), tmp_path, torch.device("cpu"),
                      progress=False)
    scale = {id(p): group["lr_scale"] for group in trainer.optimizer.param_groups
             for p in group["params"]}
    named = {name: scale.get(id(p)) for name, p in trainer.model.named_parameters()}
    assert all(rate is None for name, rate in named.items() if name.startswith("backbone."))
    assert all(rate == 0.2 for name, rate in named.items() if name.startswith("branch."))
    assert all(rate == 1.0 for name, rate in named.items()
               if name.startswith(("attention.", "adapter.", "projection.")))


def test_its_feature_cache_never_mixes_with_a_plain_network_cut_at_the_same_stage(tmp_path,
                                                                                 data_dir):
    """The cached "lower" part of impdrop_net is the whole global branch, of a plain
    retrieval_net cut at stage 3 only the levels below it: same recipe keys, two caches."""
    tiny = {"data": {"max_images": 8}, "cache": {"views": 1, "dir": str(tmp_path / "cache")},
            "sampler": {"p": 2, "k": 2}, "epochs": 1}
    widths = {}
    for architecture in ("impdrop_net", "retrieval_net"):
        config = load_config(CONFIGS / "impdrop.yaml",
                             {**tiny, "model": {"architecture": architecture}})
        if architecture == "retrieval_net":
            for key in ("attend_at_stage", "branch_stages", "attention_width",
                        "attention_pretrain"):
                config["model"].pop(key)
        trainer = Trainer(config, tmp_path / architecture, torch.device("cpu"), progress=False)
        widths[architecture] = trainer.features.cache["lower"].shape[-1]
    assert widths == {"impdrop_net": 40 + 80 + 112 + 1280, "retrieval_net": 40}
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


# -- the recipe and explain ------------------------------------------------------------------
@pytest.mark.train
def test_the_impdrop_recipe_trains_end_to_end_on_a_smoke_budget(impdrop_run, data_dir):
    with open(impdrop_run / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(np.isfinite(float(row["triplet"])) for row in rows)
    payload = torch.load(impdrop_run / "best.pt", weights_only=True)
    assert not any(key.startswith("backbone.") for key in payload["state_dict"])  # all frozen
    assert any(key.startswith("branch.") for key in payload["state_dict"])
    assert (impdrop_run / "best.pt").stat().st_size < 10 * 2**20
    trained = create_model(impdrop_run / "best.pt")
    untrained = create_model("impdrop_net")
    assert not torch.equal(trained.attention.out.weight, untrained.attention.out.weight)
    encoder = Encoder(trained)
    vector = encoder.embed_one(data_dir / "luma" / "images" / PHOTO)
    assert vector.shape == (256,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    summary = json.loads((impdrop_run / "attention_pretrain.json").read_text())
    assert summary["images"] == 6 and summary["agreement_after"] > summary["agreement_before"]


@pytest.mark.train
def test_explain_overlays_the_attention_map_on_the_photo(impdrop_run, data_dir, tmp_path):
    photo = data_dir / "luma" / "images" / PHOTO
    out = tmp_path / "heat.png"
    result = subprocess.run([VESTIS, "explain", str(photo), "--model",
                             str(impdrop_run / "best.pt"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "28x28" in result.stdout
    original = Image.open(photo).convert("RGB")
    heat = Image.open(out).convert("RGB")
    assert heat.size == original.size
    assert np.abs(np.asarray(heat, np.float32) - np.asarray(original, np.float32)).mean() > 10



def test_the_overlay_puts_the_map_where_the_photo_is_in_the_model_input():
    """A wide photo sits in the middle rows of the letterboxed square: the map's top and
    bottom (the padding) are cut off, and its right half stays on the right of the photo."""
    preprocess = create_model("lite0").preprocess  # 224 px
    photo = Image.new("RGB", (200, 100), (128, 128, 128))  # rows 56-167 of the square
    padding_only = np.zeros((1, 224, 224), np.float32)
    padding_only[:, :50] = 1.0
    right_half = np.zeros((1, 8, 8), np.float32)
    right_half[..., 4:] = 1.0
    cold = np.asarray(overlay(photo, padding_only, preprocess), np.float32)
    red = np.asarray(overlay(photo, right_half, preprocess), np.float32)[..., 0]
    assert cold.shape == (100, 200, 3) and cold[..., 0].max() < 100  # all blue: nothing hot
    assert red[:, 120:].mean() > red[:, :80].mean() + 50
    two = overlay(photo, np.concatenate([right_half, 1 - right_half]), preprocess)
    assert two.size == (400, 100)  # one panel per map


def test_explain_refuses_a_model_without_an_attention_map(data_dir, tmp_path):
    photo = data_dir / "luma" / "images" / PHOTO
    result = subprocess.run([VESTIS, "explain", str(photo), "--model", "m_heads_net", "--out",
                             str(tmp_path / "heat.png")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "no attention map" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "heat.png").exists()


# -- attention pre-training on CCP person/garment masks -------------------------------------
def test_the_mask_is_letterboxed_like_the_photo_and_its_padding_is_unknown():
    mask = np.zeros((100, 200), np.uint8)  # a wide photo: rows 56-167 of a 224 square
    mask[:, 100:] = 1  # foreground on the right half
    boxed = letterbox_mask(mask, 224)
    assert (boxed[:56] == 255).all() and (boxed[168:] == 255).all()
    assert (boxed[56:168, :112] == 0).all() and (boxed[56:168, 112:] == 1).all()
    targets, weights = cell_targets(boxed, (28, 28))
    assert weights[0, 0].max() == 0 and weights[0, 14].min() == 1  # padding rows weigh 0
    assert targets[0, 14, :14].max() == 0 and targets[0, 14, 14:].min() == 1


def test_pretraining_on_ccp_masks_raises_the_attentions_agreement_on_held_out_photos(data_dir):
    csv_path = require_data(data_dir / "ccp" / "annotations.csv")
    torch.manual_seed(0)
    model = create_model("impdrop_net")
    train_maps = masked_maps(model, csv_path, 8, seed=0)
    held_out = masked_maps(model, csv_path, 4, seed=0, skip=8)
    frozen = {name: p.clone() for name, p in model.named_parameters()
              if not name.startswith("attention.")}
    before = mask_agreement(model, held_out), mask_agreement(model, train_maps)
    losses = fit_attention(model, train_maps, epochs=12, lr=3e-3)
    after = mask_agreement(model, held_out), mask_agreement(model, train_maps)
    assert losses[-1] < losses[0]
    assert after[1] > before[1] + 0.1  # the photos it learnt from
    assert after[0] > before[0] + 0.05  # and photos it never saw: the person, not the photo
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters()
               if name in frozen)


def test_the_recipes_attention_pretrain_option_is_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="epoch"):
        pretrain_spec({"masks": "a.csv", "epoch": 3})
    with pytest.raises(ValueError, match="masks"):
        pretrain_spec({"epochs": 3})
    with pytest.raises(ValueError, match="attention_pretrain key"):
        load_config(CONFIGS / "impdrop.yaml", {"model": {"attention_pretrain": {"epoch": 1}}})
    spec = load_config(CONFIGS / "impdrop.yaml")["model"]["attention_pretrain"]
    assert Path(spec["masks"]).is_absolute() and spec["epochs"] >= 1

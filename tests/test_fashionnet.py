"""FashionNet: the landmark branch (trained on landmarks read off CCP masks), pooling at the
predicted landmarks, the joint loss, and the recipe end to end."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vestis.models.fashionnet as fashionnet_module
from tests.conftest import require_data
from tests.smoke import smoke, smoke_log_rows
from vestis.detect.groups import GROUPS
from vestis.detect.landmarks import LANDMARKS, described_garment, garment_landmarks
from vestis.losses import LandmarkLoss, TrainBatch, create_loss
from vestis.models import Encoder, create_model
from vestis.models.fashionnet import FashionNet, LandmarkHead, cell_centres
from vestis.train import load_config
from vestis.train.landmark_targets import (
    fit_landmarks,
    landmark_error,
    landmark_set,
    letterboxed_points,
)
from vestis.train.sources import build_sources
from vestis.train.trainer import split_metrics

SMOKE = {**smoke(max_images=32, batches_per_epoch=4),
         "model": {"landmark_pretrain": {"max_images": 6, "epochs": 3}}}


@pytest.fixture(scope="module")
def model() -> FashionNet:
    return create_model("fashionnet", levels=[4, "head"], pooling="gem", embed_dim=64)


def test_local_features_are_the_map_at_each_visible_landmark(model):
    height, width = 14, 14
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    stage_map = torch.stack([xs.float(), ys.float(), torch.ones(height, width)])[None]
    # pixel centres: x = (i + 0.5) / width * 2 - 1 lands exactly on column i
    columns, rows = [1, 3, 5, 7, 9, 11, 12, 13], [2, 2, 4, 4, 8, 8, 13, 13]
    points = torch.tensor([[[(c + 0.5) / width * 2 - 1, (r + 0.5) / height * 2 - 1]
                            for c, r in zip(columns, rows, strict=True)]])
    visible = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    local = model.local_features(stage_map, points, visible).reshape(len(LANDMARKS), 3)
    scale = local[0, 2]  # every visible landmark's third channel is 1 x the same norm factor
    assert torch.allclose(local[:6, 0] / scale, torch.tensor(columns[:6]).float(), atol=1e-4)
    assert torch.allclose(local[:6, 1] / scale, torch.tensor(rows[:6]).float(), atol=1e-4)
    assert torch.count_nonzero(local[6:]) == 0  # invisible landmarks contribute nothing
    assert torch.linalg.norm(local) == pytest.approx(1.0, abs=1e-5)


def test_the_described_garment_is_the_largest_body_garment():
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[2:10, 2:10] = 6  # footwear: never described
    labels[10:20, 5:35] = 2  # upper, 300 pixels
    labels[20:38, 10:30] = 4  # lower, 360 pixels
    group, mask = described_garment(labels)
    assert group == "lower" and mask.sum() == 360
    assert described_garment(np.zeros((8, 8), dtype=np.uint8)) == (None, None)


def test_the_model_predicts_its_own_landmarks_without_the_parser(model):
    tree = ast.parse(Path(fashionnet_module.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names]
    assert not any(name.startswith("vestis.detect") for name in imported)  # no layer cycle
    assert not any("parser" in key for key in model.state_dict())
    assert any(key.startswith("landmark_head.") for key in model.state_dict())
    assert Encoder(model).backend_name == "torch"
    with pytest.raises(ValueError, match="does not export to ONNX"):
        Encoder(model, backend="onnx")


def test_the_landmark_location_is_the_soft_argmax_of_its_heat_map():
    head = LandmarkHead(channels=4, count=8, width=8)
    with torch.no_grad():
        head.heatmaps.weight.zero_()
        head.heatmaps.bias.zero_()
    stage_map = torch.randn(2, 4, 14, 10)
    points, logits = head(stage_map)
    assert points.shape == (2, 8, 2) and logits.shape == (2, 8)
    assert torch.allclose(points, torch.zeros_like(points), atol=1e-6)  # flat: the centre
    hidden = torch.zeros(1, 8, 14, 10)
    hidden[0, :, 3, 7] = 50.0  # one peak, at row 3, column 7
    weights = hidden.flatten(2).softmax(-1).view_as(hidden)
    x = (weights.sum(2) * cell_centres(10)).sum(-1)
    assert x[0, 0].item() == pytest.approx((7 + 0.5) / 10 * 2 - 1, abs=1e-4)


def test_local_features_are_pooled_at_the_predicted_landmarks(model):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        stage_map = model.landmark_map(images)
        points, visible = model.landmarks(images)
        local = model.extract(images)[:, model.global_dim:]
        expected = model.local_features(stage_map, points, visible)
        model.landmark_head.heatmaps.bias[:] = torch.linspace(-3, 3, 8)
        model.landmark_head.heatmaps.weight.normal_(0, 1.0)
        moved, _ = model.landmarks(images)
        moved_local = model.extract(images)[:, model.global_dim:]
    assert torch.allclose(local, expected, atol=1e-5)
    assert (moved - points).abs().max() > 0.05
    assert (moved_local - local).abs().max() > 1e-3  # the pooling follows the prediction


# -- landmark targets and the landmark branch's training --------------------------------------
def test_landmark_targets_are_the_mask_landmarks_placed_in_the_letterboxed_input():
    groups = np.zeros((100, 60), np.uint8)  # a tall photo: columns 42-181 of a 224 square
    groups[20:80, 10:50] = GROUPS.index("upper")
    found = garment_landmarks(groups)
    points = letterboxed_points(found.points, 60, 100, 224)
    assert found.visible.all()
    width = round(60 * 2.24)  # 134 columns, centred
    pixel = (points + 1) / 2 * 224  # back to the square's pixels
    left = (224 - width) // 2
    assert np.allclose(pixel[:, 0], left + (found.points[:, 0] + 0.5) * width / 60, atol=1e-3)
    assert np.allclose(pixel[:, 1], (found.points[:, 1] + 0.5) * 2.24, atol=1e-3)
    blank = garment_landmarks(np.zeros((10, 10), np.uint8))
    assert not blank.visible.any()


def test_the_landmark_loss_regresses_visible_locations_and_classifies_visibility():
    criterion = LandmarkLoss()
    target = (torch.zeros(1, 8, 2), torch.tensor([[1.0] * 4 + [0.0] * 4]))
    points = torch.zeros(1, 8, 2)
    points[0, 4:] = 0.9  # wrong, but on invisible landmarks: no location cost
    logits = torch.tensor([[20.0] * 4 + [-20.0] * 4])
    total, parts = criterion((points, logits), target)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    points[0, 0] = torch.tensor([0.3, 0.4])  # squared distance 0.25 on one of four visible
    total, parts = criterion((points, -logits), target)
    assert parts["landmark_location"] == pytest.approx(0.25 / 4)
    assert parts["landmark_visibility"] == pytest.approx(20.0, abs=1e-3)


def test_training_the_landmark_branch_on_ccp_masks_lowers_its_error_on_held_out_photos(
        data_dir):
    csv_path = require_data(data_dir / "ccp" / "annotations.csv")
    torch.manual_seed(0)
    net = create_model("fashionnet", levels=["head"], embed_dim=32)
    train_set = landmark_set(net, csv_path, 12, seed=0)
    held_out = landmark_set(net, csv_path, 6, seed=0, skip=12)
    assert 0.3 < float(train_set.visible.mean()) <= 1
    frozen = {k: v.clone() for k, v in net.state_dict().items()
              if not k.startswith("landmark_head.")}
    before = landmark_error(net, held_out), landmark_error(net, train_set)
    losses = fit_landmarks(net, train_set, epochs=20)
    after = landmark_error(net, held_out), landmark_error(net, train_set)
    assert losses[-1] < 0.5 * losses[0]
    assert after[1] < 0.5 * before[1]
    assert after[0] < 0.85 * before[0]  # photos it never saw
    assert all(torch.equal(v, frozen[k]) for k, v in net.state_dict().items() if k in frozen)


# -- the joint loss ----------------------------------------------------------------------------
def joint_batch(seed: int = 0, attributes: bool = True, landmarks: bool = True) -> TrainBatch:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(2)
    target = (torch.rand(8, 8, 2, generator=generator) * 2 - 1,
              (torch.rand(8, 8, generator=generator) > 0.3).float())
    prediction = (torch.zeros(8, 8, 2, requires_grad=True), torch.zeros(8, 8, requires_grad=True))
    return TrainBatch(
        embeddings=torch.randn(8, 6, generator=generator, requires_grad=True),
        features=torch.randn(8, 5, generator=generator, requires_grad=True),
        labels=labels, categories=torch.tensor([0, 0, 1, 1, 2, 2, -1, -1]),
        attributes=(torch.tensor([[1, 0, -1]] * 8) if attributes else None),
        landmark_prediction=prediction if landmarks else None,
        landmark_target=target if landmarks else None)


def test_the_joint_loss_is_triplet_plus_category_plus_attributes_plus_landmarks():
    torch.manual_seed(0)
    loss = create_loss({"name": "fashionnet", "attributes": 3, "category_weight": 0.5,
                        "attribute_weight": 2.0, "landmark_weight": 3.0},
                       num_labels=4, num_categories=3, feature_dim=5, embed_dim=6)
    batch = joint_batch()
    output = loss(batch)
    triplet = loss.triplet(F.normalize(batch.embeddings, dim=1), batch.labels)
    category = F.cross_entropy(loss.classifier(batch.features[:6]), batch.categories[:6])
    logits = loss.attribute_head(batch.features)[:, :2]
    attribute = F.binary_cross_entropy_with_logits(logits, batch.attributes[:, :2].float())
    landmark, _ = LandmarkLoss()(batch.landmark_prediction, batch.landmark_target)
    expected = triplet + 0.5 * category + 2.0 * attribute + 3.0 * landmark
    assert output.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"triplet", "category_ce", "attribute_bce", "landmark_location",
            "landmark_visibility"} <= set(output.parts)
    output.total.backward()
    assert batch.landmark_prediction[0].grad.abs().sum() > 0
    assert loss.classifier.weight.grad.abs().sum() > 0
    assert loss.attribute_head.weight.grad.abs().sum() > 0


def test_the_joint_loss_uses_only_the_targets_the_batch_has():
    loss = create_loss({"name": "fashionnet"}, num_labels=4, num_categories=3, feature_dim=5,
                       embed_dim=6)
    batch = joint_batch(attributes=False, landmarks=False)
    batch.categories = torch.full((8,), -1)
    output = loss(batch)
    assert set(output.parts) == {"triplet"}
    assert output.total.item() == pytest.approx(output.parts["triplet"], rel=1e-6)


@pytest.mark.train
def test_the_fashionnet_recipe_trains_end_to_end_on_a_smoke_budget(tmp_path, data_dir):
    rows = smoke_log_rows("fashionnet", tmp_path, SMOKE)
    assert all(np.isfinite(float(row["triplet"])) for row in rows)
    assert all(np.isfinite(float(row["category_ce"])) for row in rows)  # the joint loss
    summary = json.loads((tmp_path / "landmark_pretrain.json").read_text())
    assert summary["images"] == 6 and summary["error_after"] < summary["error_before"]
    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    photos = [data_dir / "luma" / "images" / "mh06-black_main.jpg",
              data_dir / "luma" / "images" / "mh06-blue_main.jpg"]
    vectors = encoder.embed(photos)
    assert vectors.shape == (2, 256) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    assert encoder.backend_name == "torch"
    # What training reported is what the saved model gives (its landmark branch in eval mode).
    logged = torch.load(tmp_path / "last.pt", weights_only=True)["meta"]["metrics"]
    saved = Encoder.from_name(str(tmp_path / "last.pt"))
    _, validation = build_sources(load_config(tmp_path / "config.yaml"))
    for split in validation:
        split_vectors = saved.embed([s.path for s in split.samples], [s.box for s in split.samples])
        for name, value in split_metrics(split_vectors, split).items():
            assert value == pytest.approx(logged[name], abs=1e-4), name

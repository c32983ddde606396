"""SC/RC-CapsNet: squash, dynamic routing, the margin and masked reconstruction losses, the
network on cached stage maps, and the recipes end to end."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.smoke import CONFIGS, smoke, smoke_log_rows
from vestis.losses import TrainBatch, create_loss
from vestis.losses.capsule import CapsuleLoss, margin_loss, mask_capsules
from vestis.models import Encoder, create_model, save_checkpoint
from vestis.models.capsnet import ResidualUnit, dynamic_routing, routing_agreement, squash
from vestis.train import train

SMOKE = smoke(max_images=32, batches_per_epoch=6)
CATEGORIES = 29  # of the recipes' training data


def capsnet(**kwargs):
    torch.manual_seed(0)
    return create_model("capsnet", pretrained=False, **{"num_categories": 5, **kwargs})


# -- squash and routing ----------------------------------------------------------------------
def test_squash_keeps_direction_and_maps_length_below_one():
    torch.manual_seed(0)
    s = torch.randn(6, 8) * torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 10.0])[:, None]
    v = squash(s)
    length, v_length = s.norm(dim=1), v.norm(dim=1)
    assert (v_length < 1).all()
    assert torch.allclose(v_length, length**2 / (1 + length**2), rtol=1e-5)
    assert torch.allclose(F.cosine_similarity(v, s, dim=1), torch.ones(6), atol=1e-5)
    assert (v_length.diff() > 0).all()  # longer in, longer out
    assert torch.equal(squash(torch.zeros(2, 8)), torch.zeros(2, 8))


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_coupling_coefficients_sum_to_one_over_the_parent_capsules(iterations):
    torch.manual_seed(iterations)
    votes = torch.randn(3, 20, 6, 16)
    parents, couplings = dynamic_routing(votes, iterations)
    assert parents.shape == (3, 6, 16) and couplings.shape == (3, 20, 6)
    assert (couplings >= 0).all()
    assert torch.allclose(couplings.sum(dim=2), torch.ones(3, 20), atol=1e-6)
    if iterations == 1:  # no agreement measured yet: uniform couplings
        assert torch.allclose(couplings, torch.full_like(couplings, 1 / 6))
    else:
        assert not torch.allclose(couplings, torch.full_like(couplings, 1 / 6))


def consistent_votes() -> torch.Tensor:
    """Children 4j..4j+3 vote alike for parent j and at random for the other parents."""
    torch.manual_seed(0)
    batch, parents, group, dim = 4, 3, 4, 8
    votes = 0.2 * torch.randn(batch, parents * group, parents, dim)
    directions = F.normalize(torch.randn(batch, parents, dim), dim=2)
    for j in range(parents):
        agreeing = 0.9 * directions[:, j, None] + 0.05 * torch.randn(batch, group, dim)
        votes[:, j * group:(j + 1) * group, j] = agreeing
    return votes


def test_more_routing_iterations_increase_agreement_on_a_consistent_input():
    votes = consistent_votes()
    agreement, lengths = [], []
    for iterations in (1, 2, 3, 4):
        parents, couplings = dynamic_routing(votes, iterations)
        agreement.append(routing_agreement(votes, parents, couplings))
        lengths.append(parents.norm(dim=2))
    for before, after in zip(agreement, agreement[1:], strict=False):
        assert (after > before).all()
    assert (lengths[-1] > lengths[0]).all()  # the agreeing votes add up
    own_parent = [own_couplings(dynamic_routing(votes, iterations)[1])
                  for iterations in (1, 2, 3)]
    assert torch.allclose(own_parent[0], torch.full_like(own_parent[0], 1 / 3))
    assert (own_parent[1] > own_parent[0]).all() and (own_parent[2] > own_parent[1]).all()
    assert (own_parent[2].mean(dim=1) > 0.5).all()  # routed mostly where the votes agree


def own_couplings(couplings: torch.Tensor) -> torch.Tensor:
    """(B, 12): each child's coupling to the parent its group agrees on."""
    return torch.cat([couplings[:, 4 * j:4 * j + 4, j] for j in range(3)], dim=1)


def test_routing_gradients_reach_every_vote_through_the_last_round():
    votes = torch.randn(2, 10, 4, 16, requires_grad=True)
    parents, _ = dynamic_routing(votes, 3)
    parents.norm(dim=2).sum().backward()
    assert votes.grad is not None and (votes.grad.abs().sum(dim=3) > 0).all()


# -- the losses --------------------------------------------------------------------------------
def test_margin_loss_is_zero_when_perfectly_separated_and_positive_otherwise():
    separated = torch.tensor([[0.95, 0.05, 0.0], [0.0, 0.1, 0.9]])
    assert margin_loss(separated, torch.tensor([0, 2])).item() == 0.0
    short_true = torch.tensor([[0.5, 0.05, 0.0]])
    long_other = torch.tensor([[0.95, 0.05, 0.3]])
    assert margin_loss(short_true, torch.tensor([0])).item() == pytest.approx(0.4**2)
    assert margin_loss(long_other, torch.tensor([0])).item() == pytest.approx(0.5 * 0.2**2)
    swapped = margin_loss(separated, torch.tensor([1, 0]))  # the wrong capsules are long
    row_0 = (0.9 - 0.05)**2 + 0.5 * (0.95 - 0.1)**2
    row_1 = 0.9**2 + 0.5 * (0.9 - 0.1)**2
    assert swapped.item() == pytest.approx((row_0 + row_1) / 2)


def small_loss(**kwargs) -> CapsuleLoss:
    torch.manual_seed(0)
    return CapsuleLoss(num_categories=4, capsule_dim=5, embed_dim=20, feature_dim=26,
                       decoder_hidden=(16,), **kwargs)


def test_the_decoder_sees_only_the_true_class_capsule():
    capsules = torch.randn(3, 4, 5)
    categories = torch.tensor([1, 3, 0])
    masked = mask_capsules(capsules, categories).view(3, 4, 5)
    for row, category in enumerate(categories.tolist()):
        assert torch.equal(masked[row, category], capsules[row, category])
        others = [k for k in range(4) if k != category]
        assert not masked[row, others].any()

    loss = small_loss()
    target = torch.rand(3, 6)
    capsules.requires_grad_()
    loss.reconstruction_error(capsules, categories, target).backward()
    moved = capsules.grad.abs().sum(dim=2) > 0
    assert moved.tolist() == [[False, True, False, False], [False, False, False, True],
                              [True, False, False, False]]
    with torch.no_grad():
        changed = capsules.clone()
        changed[0, 0] += 5.0  # not row 0's category
        assert loss.reconstruction_error(changed, categories, target) == \
            loss.reconstruction_error(capsules, categories, target)


def test_capsule_loss_combines_its_terms_and_skips_unknown_categories():
    loss = small_loss(triplet_weight=1.0, margin_weight=2.0, reconstruction_weight=0.1)
    torch.manual_seed(1)
    features = torch.randn(8, 26).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    known = TrainBatch(features[:, :20], features, labels, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    output = loss(known)
    parts = output.parts
    assert parts["margin"] > 0 and parts["reconstruction"] > 0
    assert output.total.item() == pytest.approx(
        parts["triplet"] + 2.0 * parts["margin"] + 0.1 * parts["reconstruction"], rel=1e-5)

    unknown = TrainBatch(features[:, :20], features, labels, torch.full((8,), -1))
    output = loss(unknown)
    assert output.parts["margin"] == 0.0 and output.parts["reconstruction"] == 0.0
    assert math.isnan(output.parts["capsule_accuracy"])
    assert output.total.item() == pytest.approx(output.parts["triplet"])
    output.total.backward()
    assert not features.grad[:, 20:].any()  # the target gets no gradient from the triplet


def test_bad_capsule_loss_settings_are_refused():
    with pytest.raises(ValueError, match="capsule_dim"):
        create_loss({"name": "capsule", "capsule_dim": 8}, num_labels=4, num_categories=4,
                    feature_dim=80, embed_dim=64)
    with pytest.raises(ValueError, match="target"):
        create_loss({"name": "capsule"}, num_labels=4, num_categories=4, feature_dim=64,
                    embed_dim=64)
    with pytest.raises(ValueError, match="categories"):
        create_loss({"name": "capsule"}, num_labels=4, num_categories=1, feature_dim=32,
                    embed_dim=16)


# -- the network -------------------------------------------------------------------------------
def test_extract_is_the_lower_then_the_upper_part_and_the_embedding_is_the_capsules():
    model = capsnet()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.extract(x)
        entry, lower = model.extract_lower(x, 5)
        assert entry.shape == (2, 112, 14, 14)
        assert torch.equal(features, model.extract_upper(entry, lower, 5))
        adapted, embedding = model.head(features)
        vectors = model(x)
    assert model.embed_dim == model.output_dim == 5 * 16
    assert features.shape == (2, model.adapter_output_dim) == (2, 80 + 112 * 4 * 4)
    assert torch.equal(adapted, features) and torch.equal(embedding, features[:, :80])
    assert torch.equal(vectors, embedding)
    lengths = embedding.view(2, 5, 16).norm(dim=2)
    assert (lengths < 1).all()
    target = features[:, 80:]
    assert target.min() == 0 and target.max() == 1  # scaled like pixel intensities


@pytest.mark.parametrize(("variant", "stage", "stride", "grid"),
                         [("lite0", 5, 2, 7), ("lite0", 6, 1, 7), ("lite1", 5, 2, 8)])
def test_the_class_capsules_are_built_for_the_primary_grid(variant, stage, stride, grid):
    model = capsnet(backbone=variant, capsule_at_stage=stage, block_stride=stride)
    size = model.preprocess.size
    primary_count = model.class_capsules.weight.shape[0]
    assert primary_count == grid * grid * 8
    with torch.no_grad():
        entry, _ = model.extract_lower(torch.randn(1, 3, size, size), stage)
        assert model.primary(model.block(entry)).shape == (1, primary_count, 8)


def test_the_capsules_replace_the_upper_backbone_stages():
    model = capsnet()
    assert not [p for m in model.backbone.stage_modules(5) for p in m.parameters()]
    first_dropped = model.backbone.stage_ends[4] + 1
    keys = model.state_dict()
    assert not any(k.startswith((f"backbone._blocks.{first_dropped}.", "backbone._conv_head"))
                   for k in keys)
    assert f"backbone._blocks.{first_dropped - 1}._project_conv.weight" in keys


def test_sc_stacks_convolutions_and_rc_adds_shortcuts():
    sc, rc = capsnet(block="sc").block, capsnet(block="rc").block
    assert sum(isinstance(m, torch.nn.Conv2d) for m in sc.modules()) == 4
    assert not any(isinstance(m, ResidualUnit) for m in sc.modules())
    units = [m for m in rc.modules() if isinstance(m, ResidualUnit)]
    assert len(units) == 2
    assert isinstance(units[1].shortcut, torch.nn.Identity)
    assert not isinstance(units[0].shortcut, torch.nn.Identity)  # 112 → 128 channels, stride 2

    # with its body's last BatchNorm zeroed, a unit passes its input through the shortcut
    unit = units[1].eval()
    with torch.no_grad():
        unit.body[-1].weight.zero_()
        unit.body[-1].bias.zero_()
        x = torch.randn(2, 128, 7, 7)
        assert torch.equal(unit(x), F.relu(x))


def test_bad_capsnet_settings_are_refused():
    with pytest.raises(ValueError, match="num_categories"):
        create_model("capsnet", pretrained=False)
    with pytest.raises(ValueError, match="embed_dim"):
        capsnet(embed_dim=256)
    with pytest.raises(ValueError, match="even"):
        capsnet(block="rc", block_depth=3)
    with pytest.raises(ValueError, match="block"):
        capsnet(block="dense")
    with pytest.raises(ValueError, match="finetune_from_stage"):
        capsnet().extract_lower(torch.randn(1, 3, 224, 224), 4)


def test_a_checkpoint_rebuilds_the_same_network_and_stays_small(tmp_path):
    torch.manual_seed(0)
    model = create_model("capsnet", num_categories=CATEGORIES, block="rc")
    path = save_checkpoint(model, tmp_path / "capsnet.pt", include_backbone=False)
    assert path.stat().st_size < 10 * 2**20
    restored = create_model(path)
    assert restored.config == model.config
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(restored(x), model.eval()(x), atol=1e-6)


# -- the recipes -------------------------------------------------------------------------------
def test_a_recipe_must_cut_the_backbone_where_the_capsules_start(tmp_path, data_dir):
    wrong = {**SMOKE, "model": {"finetune_from_stage": 6}}
    with pytest.raises(ValueError, match="finetune_from_stage: 5"):
        train(CONFIGS / "sc_capsnet.yaml", tmp_path, overrides=wrong, progress=False)


@pytest.mark.train
@pytest.mark.parametrize("recipe", ["sc_capsnet", "rc_capsnet"])
def test_the_capsnet_recipes_train_end_to_end_on_a_smoke_budget(recipe, tmp_path, data_dir):
    rows = smoke_log_rows(recipe, tmp_path, SMOKE)
    for key in ("loss", "triplet", "margin", "reconstruction", "capsule_accuracy"):
        assert all(np.isfinite(float(row[key])) for row in rows), key
    assert float(rows[1]["margin"]) < float(rows[0]["margin"])
    assert {"luma_R@1", "clothing_R@1"} <= set(rows[0])

    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert payload["includes_backbone"] is False
    assert not any(key.startswith("backbone.") for key in payload["state_dict"])
    assert (tmp_path / "best.pt").stat().st_size < 10 * 2**20
    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    categories = encoder.model.num_categories
    assert categories >= 2 and encoder.model.config["block"] == recipe[:2]
    vector = encoder.embed_one(data_dir / "luma" / "images" / "mh06-blue_main.jpg")
    assert vector.shape == (categories * 16,)
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_a_capsnet_embeds_in_torch_when_its_export_fails_and_says_why_in_one_line(caplog):
    model = capsnet()
    with caplog.at_level(logging.WARNING, logger="vestis"):
        encoder = Encoder(model, backend="auto")
    assert encoder.backend_name == "torch"
    warnings = [r.getMessage() for r in caplog.records if "ONNX Runtime unavailable" in r.message]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    image = np.full((64, 48, 3), 120, np.uint8)
    vector = encoder.embed_arrays(encoder.preprocess.to_array(Image.fromarray(image))[None])
    assert vector.shape == (1, model.output_dim)

"""HDC: the cascade of hard pairs between stages, the stage heads and the recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from tests.smoke import smoke_log_rows
from vestis.losses import TrainBatch, create_loss
from vestis.losses.hdc import HDCLoss
from vestis.models import Encoder, create_model, save_checkpoint

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
E = torch.eye(4)


def first_stage() -> torch.Tensor:
    """Not separated: positive (0, 1) (orthogonal), negatives (0, 2) and (0, 3) (identical).
    Separated: positive (2, 3), every pair of class 2 (4, 5 lie apart from everyone)."""
    return torch.stack([E[0], E[1], E[0], E[0], E[2], E[2]])


def second_stage() -> torch.Tensor:
    """A stage that gets every negative pair wrong: all samples point nearly the same way."""
    return F.normalize(torch.stack([E[0], E[1], E[0] + 0.1 * E[1], E[0] + 0.1 * E[2],
                                    E[0] + 0.1 * E[3], E[0] - 0.1 * E[1]]), dim=1)


def pair_sets(pairs) -> tuple[set, set]:
    a1, p, a2, n = (x.tolist() for x in pairs)
    return set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True))


def batch_of(*stages: torch.Tensor) -> TrainBatch:
    embeddings = torch.cat(stages, dim=1)
    return TrainBatch(embeddings, embeddings, LABELS, torch.full_like(LABELS, -1))


def test_a_stage_passes_on_exactly_the_pairs_it_did_not_separate():
    loss = HDCLoss(stage_dims=(4, 4), pos_margin=0.8, neg_margin=0.4)
    hard = loss.pass_hard(first_stage(), LABELS, lmu.get_all_pairs_indices(LABELS))
    positives, negatives = pair_sets(hard)
    assert positives == {(0, 1), (1, 0)}
    assert negatives == {(0, 2), (2, 0), (0, 3), (3, 0)}


def test_the_next_stage_learns_only_from_the_hard_pairs():
    loss = HDCLoss(stage_dims=(4, 4), pos_margin=0.8, neg_margin=0.4)
    second = second_stage().requires_grad_()
    output = loss(batch_of(first_stage(), second))
    assert output.parts["stage_1_pairs"] == 30 and output.parts["stage_2_pairs"] == 6
    (gradient,) = torch.autograd.grad(output.total, second)
    moved = gradient.abs().sum(dim=1) > 0
    assert moved[:4].all() and not moved[4:].any()  # 4 and 5 were easy for stage 1

    # without the cascade, stage 2 would have learnt from samples 4 and 5 too
    everything = loss.contrastive(second, LABELS, lmu.get_all_pairs_indices(LABELS))
    (unfiltered,) = torch.autograd.grad(everything, second)
    assert (unfiltered[4:].abs().sum(dim=1) > 0).all()


def test_each_stage_filters_what_the_previous_one_passed_on():
    # stage 2 separates positive (0, 1) and negative (0, 3), not negative (0, 2); it would get
    # (4, 5)'s negatives wrong, but they never reach it
    second = F.normalize(torch.stack([E[0], E[0], E[0] + 0.1 * E[1], E[3], E[0], E[0]]), dim=1)
    torch.manual_seed(0)
    output = HDCLoss(stage_dims=(4, 4, 4))(batch_of(first_stage(), second, torch.randn(6, 4)))
    assert [output.parts[f"stage_{k}_pairs"] for k in (1, 2, 3)] == [30, 6, 2]
    loss = HDCLoss(stage_dims=(4, 4, 4))
    after_first = loss.pass_hard(first_stage(), LABELS, lmu.get_all_pairs_indices(LABELS))
    assert pair_sets(loss.pass_hard(second, LABELS, after_first)) == (set(), {(0, 2), (2, 0)})


def test_the_cascade_stops_when_a_stage_separates_every_pair():
    separated = torch.stack([E[0], E[0], E[1], E[1], E[2], E[2]])
    output = HDCLoss(stage_dims=(4, 4, 4))(batch_of(separated, second_stage(), second_stage()))
    assert output.parts["stage_1"] == 0.0
    assert output.parts["stage_2_pairs"] == 0 and output.parts["stage_3_pairs"] == 0
    assert output.parts["stage_2"] == 0.0 and output.total.item() == 0.0


def test_with_a_hard_fraction_a_stage_passes_on_its_hardest_pairs():
    torch.manual_seed(1)
    labels = torch.arange(4).repeat_interleave(3)
    embeddings = F.normalize(torch.randn(12, 8), dim=1)
    loss = HDCLoss(stage_dims=(8, 8), hard_fraction=0.25)
    pairs = lmu.get_all_pairs_indices(labels)
    hard = loss.pass_hard(embeddings, labels, pairs)
    similarity = embeddings @ embeddings.T
    positive = similarity[pairs[0], pairs[1]]
    negative = similarity[pairs[2], pairs[3]]
    assert len(hard[0]) == math.ceil(0.25 * len(positive))
    assert len(hard[2]) == math.ceil(0.25 * len(negative))
    kept_positive = similarity[hard[0], hard[1]]
    kept_negative = similarity[hard[2], hard[3]]
    assert kept_positive.max() <= positive.sort().values[len(hard[0]) - 1] + 1e-6
    assert kept_negative.min() >= negative.sort(descending=True).values[len(hard[2]) - 1] - 1e-6
    again = loss.pass_hard(embeddings, labels, hard)  # the miner starts from what it is given
    assert len(again[0]) == math.ceil(0.25 * len(hard[0]))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="embed_dim"):
        create_loss({"name": "hdc", "stage_dims": [64, 64]}, num_labels=2, num_categories=0,
                    feature_dim=8, embed_dim=256)
    with pytest.raises(ValueError, match="margin"):
        HDCLoss(pos_margin=0.3, neg_margin=0.5)
    with pytest.raises(ValueError, match="hard_fraction"):
        HDCLoss(hard_fraction=0.0)
    with pytest.raises(ValueError, match="shallow to deep"):
        create_model("hdc_net", pretrained=False, levels=["head", 2], stages=[2, "head"])
    with pytest.raises(ValueError, match="stages"):
        create_model("hdc_net", pretrained=False, levels=[2, 3], stages=[2, 4])


# -- the network ---------------------------------------------------------------------------
def test_each_stage_sees_only_the_levels_up_to_its_depth(tmp_path):
    torch.manual_seed(0)
    model = create_model("hdc_net", pretrained=False, levels=[2, 3, 4, "head"],
                         stages=[3, 4, "head"], stage_dims=[4, 4, 8], adapter_dim=16)
    widths = [40, 80, 112, 1280]  # Lite0's stage 2, 3, 4 and head channels
    assert model.feature_dim == sum(widths) and model.stage_ends == (120, 232, 1512)
    assert model.embed_dim == model.output_dim == 16
    features = torch.randn(6, model.feature_dim)
    with torch.no_grad():
        base = model.stage_embeddings(features)
        deeper = features.clone()
        deeper[:, 232:] += 1.0  # the head level only
        head_changed = model.stage_embeddings(deeper)
        deeper[:, 120:232] += 1.0  # and level 4
        both_changed = model.stage_embeddings(deeper)
    assert torch.equal(head_changed[0], base[0]) and torch.equal(head_changed[1], base[1])
    assert not torch.allclose(head_changed[2], base[2])
    assert torch.equal(both_changed[0], base[0]) and not torch.allclose(both_changed[1], base[1])

    with torch.no_grad():
        vectors = model.embed_features(features)
    cosines = [F.normalize(x, dim=1) @ F.normalize(x, dim=1).T for x in base]
    assert torch.allclose(vectors.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(vectors @ vectors.T, torch.stack(cosines).mean(dim=0), atol=1e-5)

    path = save_checkpoint(model, tmp_path / "hdc.pt", include_backbone=False)
    restored = create_model(path)
    assert restored.stage_dims == (4, 4, 8)
    with torch.no_grad():
        assert torch.allclose(restored.embed_features(features), vectors, atol=1e-6)


@pytest.mark.train
def test_the_hdc_recipe_trains_end_to_end_on_a_smoke_budget(tmp_path, data_dir):
    rows = smoke_log_rows("hdc", tmp_path)
    assert all(np.isfinite(float(row["hdc"])) for row in rows)
    assert all(float(row["stage_3_pairs"]) <= float(row["stage_2_pairs"])
               <= float(row["stage_1_pairs"]) for row in rows)
    assert {"luma_R@1", "clothing_R@1"} <= set(rows[0])

    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    vector = encoder.embed_one(data_dir / "luma" / "images" / "mh06-blue_main.jpg")
    assert vector.shape == (256,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    assert (tmp_path / "best.pt").stat().st_size < 10 * 2**20

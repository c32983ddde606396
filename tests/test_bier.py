"""BIER: boosting weights, the boosted loss, the ensemble vector and the independence init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.smoke import CONFIGS, smoke_log_rows
from vestis.losses import TrainBatch, create_loss
from vestis.losses.bier import BIERLoss, balanced_pair_weights, cumulative_response
from vestis.models import Encoder, create_model, save_checkpoint
from vestis.models.bier import cross_learner_correlation, decorrelate_groups, ensemble_weights
from vestis.train import load_config
from vestis.train.trainer import Trainer

E = torch.eye(3)


def bier_batch(*learners: torch.Tensor, labels=(0, 0, 1, 1)) -> TrainBatch:
    embeddings = torch.cat(learners, dim=1)
    labels = torch.as_tensor(labels)
    return TrainBatch(embeddings, embeddings, labels, torch.full_like(labels, -1))


def learner_one() -> torch.Tensor:
    """Samples 0, 1 (class 0) and 2, 3 (class 1). Wrong: positive (0, 1) is dissimilar,
    negatives (0, 2) and (0, 3) are identical. Right: positive (2, 3), negatives with 1."""
    return torch.stack([E[0], E[1], E[0], E[0]])


# -- boosting weights ----------------------------------------------------------------------
def test_the_next_learner_weighs_up_the_pairs_the_previous_one_got_wrong():
    loss = BIERLoss(groups=(3, 3))
    batch = bier_batch(learner_one(), torch.randn(4, 3))
    same = batch.labels[:, None] == batch.labels[None, :]
    first, second = loss.boosting_weights(loss.similarities(batch.embeddings), same)
    assert torch.equal(first, torch.ones(4, 4))
    wrong_positive, right_positive = second[0, 1], second[2, 3]
    wrong_negatives, right_negatives = second[0, [2, 3]], second[1, [2, 3]]
    assert wrong_positive > 0.5 > right_positive
    assert wrong_negatives.min() > 0.99 and right_negatives.max() < 0.01
    # the weight is the negative gradient of the deviance at the response: σ(-α (s - β) c_y)
    assert wrong_positive.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_later_weights_follow_the_cumulative_response_of_all_previous_learners():
    loss = BIERLoss(groups=(3, 3, 3))
    fixed = torch.stack([E[0], E[0], E[0], E[0]])  # learner 2 puts pair (0, 1) right
    batch = bier_batch(learner_one(), fixed, torch.randn(4, 3))
    same = batch.labels[:, None] == batch.labels[None, :]
    similarities = loss.similarities(batch.embeddings)
    weights = loss.boosting_weights(similarities, same)
    response = (1 / 3) * similarities[0] + (2 / 3) * similarities[1]  # η_2 = 2/3
    expected = torch.sigmoid(-2.0 * (response - 0.5) * torch.where(same, 1.0, -25.0))
    assert torch.allclose(weights[2], expected)
    assert weights[2][0, 1] < weights[1][0, 1]  # fixed by learner 2: weighed down again


def test_the_loss_is_the_boosted_balanced_binomial_deviance_and_weights_get_no_gradient():
    torch.manual_seed(0)
    groups = (3, 5)
    embeddings = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = BIERLoss(groups=groups, alpha=2.0, beta=0.5, negative_cost=25.0)
    output = loss(TrainBatch(embeddings, embeddings, labels, torch.full_like(labels, -1)))

    # by hand, pair by pair
    parts = [F.normalize(x, dim=1) for x in embeddings.detach().split(groups, dim=1)]
    positives = [(i, j) for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]]
    negatives = [(i, j) for i in range(6) for j in range(6) if labels[i] != labels[j]]
    expected, response = 0.0, {}
    for m, learner in enumerate(parts, start=1):
        for pairs, cost in ((positives, 1.0), (negatives, -25.0)):
            for i, j in pairs:
                s = float(learner[i] @ learner[j])
                r = response.get((i, j), 0.0)
                weight = 1.0 if m == 1 else float(torch.sigmoid(torch.tensor(-2 * (r - .5) * cost)))
                deviance = float(F.softplus(torch.tensor(-2 * (s - 0.5) * cost)))
                expected += weight * deviance / len(pairs) / len(groups)
                response[(i, j)] = (1 - 2 / (m + 1)) * r + 2 / (m + 1) * s
    assert output.total.item() == pytest.approx(expected, rel=1e-5)
    assert set(output.parts) == {"bier", "learner_1", "learner_2", "boost_weight"}

    # all learners update in one backward; the boosting weights are constants
    (gradient,) = torch.autograd.grad(output.total, embeddings)
    assert gradient[:, :3].abs().sum() > 0 and gradient[:, 3:].abs().sum() > 0
    alone = create_loss({"name": "bier", "groups": [3, 5]}, num_labels=3, num_categories=0,
                        feature_dim=8, embed_dim=8)
    same = labels[:, None] == labels[None, :]
    similarity = alone.similarities(embeddings)[0]
    first_only = (balanced_pair_weights(same) * alone.deviance(similarity, same)).sum() / 2
    (first_gradient,) = torch.autograd.grad(first_only, embeddings)
    assert torch.allclose(gradient[:, :3], first_gradient[:, :3], atol=1e-6)


def test_training_with_the_boosted_loss_separates_the_classes():
    torch.manual_seed(0)
    labels = torch.arange(5).repeat_interleave(4)
    points = torch.nn.Parameter(torch.randn(20, 12))
    loss = BIERLoss(groups=(4, 8))
    optimiser = torch.optim.Adam([points], lr=0.1)
    losses = []
    for _ in range(40):
        output = loss(TrainBatch(points, points, labels, torch.full_like(labels, -1)))
        losses.append(output.total.item())
        optimiser.zero_grad()
        output.total.backward()
        optimiser.step()
    assert losses[-1] < 0.2 * losses[0]
    assert output.parts["boost_weight"] < 0.1  # the ensemble gets almost every pair right
    response = torch.zeros(20, 20)
    for m, similarity in enumerate(loss.similarities(points.detach()), start=1):
        response = cumulative_response(response, similarity, m)
    same = labels[:, None] == labels[None, :]
    assert response[same].min() > response[~same].max()


def test_groups_must_fill_the_embedding():
    with pytest.raises(ValueError, match="embed_dim"):
        create_loss({"name": "bier", "groups": [96, 160]}, num_labels=2, num_categories=0,
                    feature_dim=8, embed_dim=512)
    with pytest.raises(ValueError, match="two"):
        BIERLoss(groups=(512,))
    with pytest.raises(ValueError, match="embed_dim"):
        create_model("bier_net", pretrained=False, groups=[96, 160, 256], embed_dim=256)


# -- the network ---------------------------------------------------------------------------
def small_net(**kwargs):
    kwargs = {"levels": ["head"], "adapter_dim": 32, "groups": [8, 8, 16], **kwargs}
    return create_model("bier_net", pretrained=False, **kwargs).train()


def test_the_retrieval_vector_gives_the_boosted_ensembles_similarity(tmp_path):
    torch.manual_seed(0)
    model = small_net().eval()
    features = torch.randn(10, model.feature_dim)
    with torch.no_grad():
        vectors = model.embed_features(features)
        learners = model.projection(model.adapter(features)).split(model.groups, dim=1)
    response = torch.zeros(10, 10)
    for m, learner in enumerate(learners, start=1):
        unit = F.normalize(learner, dim=1)
        response = cumulative_response(response, unit @ unit.T, m)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(vectors @ vectors.T, response, atol=1e-5)
    assert torch.allclose(ensemble_weights(3), torch.tensor([1 / 6, 2 / 6, 3 / 6]))

    path = save_checkpoint(model, tmp_path / "bier.pt", include_backbone=False)
    restored = create_model(path)
    assert restored.groups == (8, 8, 16)
    with torch.no_grad():
        assert torch.allclose(restored.embed_features(features), vectors, atol=1e-6)


def correlated_features(count: int, dim: int, seed: int) -> torch.Tensor:
    """Features with a few strong shared factors, so random learners start correlated."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(8, dim, generator=torch.Generator().manual_seed(99))
    codes = torch.randn(count, 8, generator=generator)
    return codes @ factors + 0.3 * torch.randn(count, dim, generator=generator)


def learner_correlation(model, features: torch.Tensor) -> float:
    with torch.no_grad():
        outputs = model.projection(model._projection_inputs(features))
    return cross_learner_correlation(outputs, model.groups)


@pytest.mark.parametrize("adapter_dim", [32, None])
def test_the_independence_initialisation_decorrelates_the_learners(adapter_dim):
    torch.manual_seed(0)
    model = small_net(adapter_dim=adapter_dim)
    train_set = correlated_features(600, model.feature_dim, seed=1)
    unseen = correlated_features(600, model.feature_dim, seed=2)
    weight = model.projection.weight.detach().clone()
    adapter_state = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    before = learner_correlation(model, train_set), learner_correlation(model, unseen)
    model.init_head(train_set)
    after = learner_correlation(model, train_set), learner_correlation(model, unseen)

    assert before[0] > 0.05
    assert after[0] < 1e-4 * before[0]
    assert after[1] < 0.2 * before[1]  # it generalises to unseen features of the same kind
    new = model.projection.weight.detach()
    assert torch.equal(new[:8], weight[:8])  # the first learner is left as it was
    assert not torch.allclose(new[8:], weight[8:])
    assert torch.allclose(new.norm(dim=1), weight.norm(dim=1), rtol=1e-4)  # unit scales kept
    for key, value in model.adapter.state_dict().items():
        assert torch.equal(value, adapter_state[key]), key


def test_decorrelation_makes_learner_outputs_covariance_orthogonal():
    generator = torch.Generator().manual_seed(0)
    inputs = correlated_features(400, 24, seed=3)
    weight = torch.randn(12, 24, generator=generator)
    new = decorrelate_groups(weight, inputs, [4, 4, 4], ridge=0.0)
    outputs = (inputs - inputs.mean(0)) @ new.T
    covariance = outputs.T @ outputs / len(inputs)
    scale = covariance.diagonal().mean()
    for a, b in ((slice(0, 4), slice(4, 8)), (slice(0, 8), slice(8, 12))):
        assert covariance[a, b].abs().max() < 1e-4 * scale


@pytest.mark.train
def test_training_initialises_the_learners_before_the_first_epoch(tmp_path, data_dir):
    """With a zero learning rate, what a run changes in the weights is the initialisation.
    (A small head: decorrelating needs more training images than the learners' input dims.)"""
    groups = [4, 4, 8]
    tiny = {"data": {"max_images": 16}, "cache": {"views": 1, "dir": None},
            "model": {"adapter_dim": 16, "embed_dim": 16, "groups": groups},
            "loss": {"groups": groups}, "sampler": {"p": 2, "k": 2}, "epochs": 1,
            "optimizer": {"lr": 0.0}}
    trainer = Trainer(load_config(CONFIGS / "bier.yaml", tiny), tmp_path, torch.device("cpu"),
                      progress=False)
    features = trainer.features.plain_train_features()
    before = learner_correlation(trainer.model, features)
    trainer.run(resume=False)
    assert learner_correlation(trainer.model, features) < 1e-3 * before


@pytest.mark.train
def test_the_bier_recipe_trains_end_to_end_on_a_smoke_budget(tmp_path, data_dir):
    rows = smoke_log_rows("bier", tmp_path)
    assert all(np.isfinite(float(row["bier"])) for row in rows)
    assert {"learner_1", "learner_3", "luma_R@1", "clothing_R@1"} <= set(rows[0])

    encoder = Encoder.from_name(str(tmp_path / "best.pt"))
    vector = encoder.embed_one(data_dir / "luma" / "images" / "mh06-blue_main.jpg")
    assert vector.shape == (512,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    assert (tmp_path / "best.pt").stat().st_size < 10 * 2**20

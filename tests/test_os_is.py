from __future__ import annotations

import math

import pytest
import torch

import vestis.losses.os_is  # noqa: F401  (registers "os_is")
from vestis.losses.base import TrainBatch
from vestis.losses.os_is import FeatureRelaxation, OSISLoss
from vestis.losses.registry import create_loss

FEATURES, EMBED, CATEGORIES = 12, 6, 3


def make_batch(
    seed: int = 0, labels: int = 4, per_label: int = 3, grad: bool = False
) -> TrainBatch:
    """P×K batch; category of label l is l % CATEGORIES, features cluster by category."""
    generator = torch.Generator().manual_seed(seed)
    label_codes = torch.arange(labels).repeat_interleave(per_label)
    categories = label_codes % CATEGORIES
    centres = 2.0 * torch.randn(CATEGORIES, FEATURES, generator=generator)
    noise = 0.5 * torch.randn(len(label_codes), FEATURES, generator=generator)
    features = centres[categories] + noise
    embeddings = torch.randn(len(label_codes), EMBED, generator=generator)
    return TrainBatch(
        embeddings=embeddings.requires_grad_(grad),
        features=features.requires_grad_(grad),
        labels=label_codes,
        categories=categories,
    )


def make_loss(**params) -> OSISLoss:
    torch.manual_seed(0)
    defaults = {"num_categories": CATEGORIES, "feature_dim": FEATURES, "relax_hidden": 16}
    return OSISLoss(**{**defaults, **params})


def os_path_grads(loss: OSISLoss) -> list[torch.Tensor | None]:
    modules = (loss.relaxation, loss.classifier)
    return [p.grad for module in modules for p in module.parameters()]


def test_is_term_never_reaches_the_relaxation_module_or_the_classifier():
    loss, batch = make_loss(), make_batch(grad=True)
    is_term = loss.is_loss(batch)
    assert is_term.item() > 0
    is_term.backward()
    assert all(g is None or torch.all(g == 0) for g in os_path_grads(loss))
    assert batch.embeddings.grad is not None and batch.embeddings.grad.abs().sum() > 0
    assert batch.features.grad is None


def test_os_term_trains_the_relaxation_module_and_the_features_but_not_the_embeddings():
    loss, batch = make_loss(), make_batch(grad=True)
    os_term, _ = loss.os_loss(batch)
    os_term.backward()
    grads = os_path_grads(loss)
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    assert batch.features.grad is not None and batch.features.grad.abs().sum() > 0
    assert batch.embeddings.grad is None


def test_total_is_the_weighted_sum_and_reports_its_parts():
    loss, batch = make_loss(os_weight=0.3, is_weight=2.0).eval(), make_batch()
    out = loss(batch)
    assert set(out.parts) == {"os", "is", "os_accuracy"}
    expected = 0.3 * out.parts["os"] + 2.0 * out.parts["is"]
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= out.parts["os_accuracy"] <= 1.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_unknown_categories_are_left_out_of_the_os_term(smoothing):
    loss, batch = make_loss(label_smoothing=smoothing).eval(), make_batch()
    unknown = torch.tensor([0, 4, 5, 9])
    batch.categories[unknown] = -1
    known = batch.categories != -1
    sub = TrainBatch(
        batch.embeddings[known], batch.features[known], batch.labels[known], batch.categories[known]
    )
    mixed, mixed_acc = loss.os_loss(batch)
    clean, clean_acc = loss.os_loss(sub)
    assert mixed.item() == pytest.approx(clean.item(), rel=1e-6)
    assert mixed_acc == clean_acc


def test_a_batch_without_known_categories_has_a_zero_os_term_and_a_finite_total():
    loss, batch = make_loss(), make_batch(grad=True)
    batch.categories.fill_(-1)
    out = loss(batch)
    assert out.parts["os"] == 0.0
    assert math.isnan(out.parts["os_accuracy"])
    assert torch.isfinite(out.total)
    out.total.backward()
    assert all(g is None or torch.all(g == 0) for g in os_path_grads(loss))
    assert torch.all(torch.isfinite(batch.embeddings.grad))


def test_out_of_range_category_codes_are_refused():
    loss, batch = make_loss(), make_batch()
    batch.categories[0] = CATEGORIES
    with pytest.raises(ValueError, match="category codes"):
        loss(batch)


@pytest.mark.slow
def test_training_the_os_path_lowers_its_loss_and_raises_its_accuracy():
    loss, batch = make_loss(relax_dropout=0.2), make_batch(seed=3, labels=6, per_label=4)
    optimiser = torch.optim.Adam(loss.parameters(), lr=0.01)

    def evaluate() -> tuple[float, float]:
        loss.eval()
        with torch.no_grad():
            out = loss(batch)
        loss.train()
        return out.parts["os"], out.parts["os_accuracy"]

    first_loss, first_acc = evaluate()
    for _ in range(40):
        optimiser.zero_grad()
        loss(batch).total.backward()
        optimiser.step()
    last_loss, last_acc = evaluate()
    assert last_loss < 0.2 * first_loss
    assert last_acc == 1.0 and first_acc < 0.9


def test_dropout_is_active_in_training_and_off_in_evaluation():
    torch.manual_seed(0)
    frm = FeatureRelaxation(FEATURES, hidden_channels=64, dropout=0.5)
    features = torch.randn(5, FEATURES)
    frm.train()
    assert not torch.allclose(frm(features), frm(features))
    frm.eval()
    assert torch.equal(frm(features), frm(features))


def test_relaxation_of_a_feature_map_is_the_pooled_relaxation_of_its_positions():
    torch.manual_seed(0)
    frm = FeatureRelaxation(FEATURES, hidden_channels=8, out_channels=5).eval()
    maps = torch.randn(2, FEATURES, 3, 4)
    positions = maps.permute(0, 2, 3, 1).reshape(-1, FEATURES)
    per_position = frm(positions).reshape(2, 12, 5).mean(dim=1)
    assert frm(maps).shape == (2, 5)
    assert torch.allclose(frm(maps), per_position, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        frm(torch.randn(2, FEATURES + 1))


def test_create_loss_builds_it_from_a_config():
    config = {"name": "os_is", "os_weight": 0.5, "margin": 0.3, "relax_hidden": 32}
    dims = {"num_labels": 10, "feature_dim": FEATURES, "embed_dim": EMBED}
    loss = create_loss(config, num_categories=CATEGORIES, **dims)
    assert isinstance(loss, OSISLoss)
    assert loss.os_weight == 0.5 and loss.triplet.margin == 0.3
    assert loss.relaxation.conv1.out_channels == 32
    assert loss.classifier.out_features == CATEGORIES
    with pytest.raises(ValueError, match="num_categories"):
        create_loss({"name": "os_is"}, num_categories=1, **dims)
    with pytest.raises(ValueError, match="no parameter 'margn'"):
        create_loss({"name": "os_is", "margn": 0.3}, num_categories=CATEGORIES, **dims)

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vestis.losses import TripletLoss


def batch(seed: int = 0, classes: int = 4, per_class: int = 3, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=generator)
    noise = 0.8 * torch.randn(len(labels), dim, generator=generator)
    return F.normalize(centres[labels] + noise, dim=1), labels


def test_batch_hard_picks_the_farthest_positive_and_the_closest_negative():
    embeddings, labels = batch()
    anchors, positives, negatives = TripletLoss(mining="batch-hard").mine(embeddings, labels)
    similarity = embeddings @ embeddings.T
    same = labels[:, None] == labels[None, :]
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True):
        others = same[a].clone()
        others[a] = False
        assert similarity[a, p] == similarity[a][others].min()
        assert similarity[a, n] == similarity[a][~same[a]].max()


def test_semi_hard_negatives_lie_inside_the_margin_beyond_the_positive():
    embeddings, labels = batch(seed=1)
    loss = TripletLoss(margin=0.3, mining="semi-hard")
    anchors, positives, negatives = loss.mine(embeddings, labels)
    assert len(anchors) > 0
    similarity = embeddings @ embeddings.T
    s_ap = similarity[anchors, positives]
    s_an = similarity[anchors, negatives]
    assert torch.all(s_an < s_ap) and torch.all(s_an > s_ap - 0.3)


def test_training_with_the_loss_separates_the_classes():
    torch.manual_seed(0)
    embeddings, labels = batch(seed=2, classes=5, per_class=4, dim=16)
    points = torch.nn.Parameter(embeddings.clone())
    loss_fn = TripletLoss(margin=0.2, mining="batch-hard")
    optimiser = torch.optim.SGD([points], lr=0.5)
    first = loss_fn(F.normalize(points, dim=1), labels).item()
    for _ in range(100):
        optimiser.zero_grad()
        loss = loss_fn(F.normalize(points, dim=1), labels)
        loss.backward()
        optimiser.step()
    assert first > 0.05 and loss.item() < 0.1 * first


def test_unknown_mining_and_bad_margin_are_refused():
    with pytest.raises(ValueError, match="mining"):
        TripletLoss(mining="hardest-ever")
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=0)

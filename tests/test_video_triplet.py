"""Unsupervised video triplets: random negatives first, the top-4 hardest once converged."""

from __future__ import annotations

import pytest
import torch

from vestis.losses import TrainBatch, create_loss
from vestis.losses.base import EpochContext

CONTEXT = EpochContext(num_labels=0, num_categories=0, embed_train_set=lambda: (None, None))


def batch(vectors: torch.Tensor, clips: list[int], epoch: int = 0) -> TrainBatch:
    return TrainBatch(embeddings=vectors, features=vectors, labels=torch.tensor(clips),
                      categories=torch.full((len(clips),), -1), epoch=epoch)


def make(**params):
    return create_loss({"name": "video_triplet", **params}, num_labels=0, num_categories=0,
                       feature_dim=4, embed_dim=4)


def test_hard_phase_takes_the_top_k_hardest_negatives_of_the_batch():
    # anchor 0 and positive 1 are one clip; 2..6 are other clips at known similarities
    anchor = torch.tensor([1.0, 0.0])
    others = [torch.tensor([c, (1 - c * c) ** 0.5]) for c in (0.9, 0.8, 0.7, 0.6, -1.0)]
    vectors = torch.stack([anchor, torch.tensor([0.95, 0.3122]), *others])
    loss = make(margin=0.2, hardest=4, hard_from_epoch=0)
    loss.on_epoch_start(0, CONTEXT)
    assert loss.hard
    out = loss(batch(vectors, [0, 0, 1, 2, 3, 4, 5]))
    sim = torch.nn.functional.normalize(vectors, dim=1) @ torch.nn.functional.normalize(
        vectors, dim=1).T
    expected = []
    for a, p in ((0, 1), (1, 0)):
        negatives = sorted((float(sim[a, n]) for n in range(2, 7)), reverse=True)[:4]
        expected += [max(0.0, s - float(sim[a, p]) + 0.2) for s in negatives]
    assert out.total.item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_random_phase_never_takes_a_negative_from_the_same_clip():
    clips = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    loss = make(margin=0.2)
    assert not loss.hard
    mask = torch.tensor(clips)[:, None] != torch.tensor(clips)[None, :]
    for _ in range(20):
        chosen = loss._random_negative(mask)
        assert bool(mask[torch.arange(12), chosen].all())


def test_switches_to_hard_negatives_once_random_ones_are_easy_and_remembers_it():
    separated = torch.eye(4).repeat_interleave(2, dim=0)  # each clip on its own axis
    loss = make(margin=0.2, converged_loss=0.05)
    loss.on_epoch_start(0, CONTEXT)
    assert loss(batch(separated, [0, 0, 1, 1, 2, 2, 3, 3])).total.item() == 0.0
    loss.on_epoch_start(1, CONTEXT)
    assert loss.hard
    resumed = make(margin=0.2, converged_loss=0.05)
    resumed.load_state_dict(loss.state_dict())
    assert resumed.hard


def test_stays_random_while_the_loss_is_high():
    torch.manual_seed(1)
    loss = make(margin=0.5, converged_loss=0.01)
    loss(batch(torch.randn(8, 4), [0, 0, 1, 1, 2, 2, 3, 3]))
    loss.on_epoch_start(1, CONTEXT)
    assert not loss.hard

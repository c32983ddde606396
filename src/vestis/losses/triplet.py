"""Triplet loss with online hard mining, on cosine distance.

Built from pytorch-metric-learning's pieces: ``TripletMarginLoss`` plus a miner that picks
the triplets of each P×K batch:

- ``batch-hard``: per anchor, the farthest positive and the closest negative;
- ``semi-hard``: negatives farther than the positive but within the margin;
- ``hard``: negatives closer than the positive;
- ``all``: every valid triplet (no mining).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity
from torch import nn

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss

MINING_STRATEGIES = ("batch-hard", "semi-hard", "hard", "all")


def create_miner(mining: str, margin: float) -> nn.Module | None:
    """The miner of a strategy; ``None`` for ``all`` (the loss then takes every triplet)."""
    if mining not in MINING_STRATEGIES:
        raise ValueError(f"unknown mining {mining!r}; one of {', '.join(MINING_STRATEGIES)}")
    if mining == "batch-hard":
        return miners.BatchHardMiner(distance=CosineSimilarity())
    if mining == "all":
        return None
    kind = "semihard" if mining == "semi-hard" else "hard"
    return miners.TripletMarginMiner(
        margin=margin, type_of_triplets=kind, distance=CosineSimilarity()
    )


class TripletLoss(nn.Module):
    """``max(0, s(a, n) - s(a, p) + margin)`` over mined triplets, with cosine similarity s."""

    def __init__(self, margin: float = 0.2, mining: str = "batch-hard"):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.margin = margin
        self.mining = mining
        self.miner = create_miner(mining, margin)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=CosineSimilarity())

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Indices (anchors, positives, negatives) of the triplets the loss will use."""
        if self.miner is None:
            from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

            return lmu.get_all_triplets_indices(labels)
        return self.miner(embeddings, labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.mine(embeddings, labels))


@register_loss("triplet")
class TripletMethod(MethodLoss):
    """The plain method: a triplet loss with mining on the normalised embeddings."""

    def __init__(self, margin: float = 0.2, mining: str = "batch-hard", **_dims):
        super().__init__()
        self.triplet = TripletLoss(margin=margin, mining=mining)

    def forward(self, batch: TrainBatch) -> LossOutput:
        loss = self.triplet(F.normalize(batch.embeddings, dim=1), batch.labels)
        return LossOutput(loss, {"triplet": float(loss.detach())})

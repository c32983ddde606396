"""What every training method's loss looks like to the trainer.

A method loss is an ``nn.Module`` (it may own parameters, such as a classifier) whose
``forward(batch: TrainBatch) -> LossOutput``. Optional hooks:

- ``on_epoch_start(epoch, context)``: called before each epoch, e.g. to rebuild a class tree
  from the embeddings of the whole training set (HTL);
- ``neighbours(label) -> Sequence[int]``: classes to sample next to ``label`` in a P×K batch
  (HTL's anchor-neighbour sampling); the trainer hands it to the ``PKSampler``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class TrainBatch:
    """One P×K batch as a loss sees it."""

    embeddings: torch.Tensor  # (B, D) raw embedding-head output, not normalised
    features: torch.Tensor  # (B, F) pooled backbone features that fed the embedding head
    labels: torch.Tensor  # (B,) instance label codes
    categories: torch.Tensor  # (B,) category codes, -1 where unknown
    epoch: int = 0
    # Optional targets a method may use when the data has them (None: it has not).
    attributes: torch.Tensor | None = None  # (B, A) 1/0 per attribute, -1 where unknown
    # FashionNet's landmarks: predicted (locations (B, 8, 2), visibility logits (B, 8)) and
    # target (locations (B, 8, 2) in [-1, 1], visibility (B, 8) in {0, 1}).
    landmark_prediction: tuple[torch.Tensor, torch.Tensor] | None = None
    landmark_target: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class LossOutput:
    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class EpochContext:
    """What the trainer offers a loss before an epoch."""

    num_labels: int
    num_categories: int
    # Computes (L2-normalised embeddings, label codes) of the whole training set, no augmentation.
    embed_train_set: Callable[[], tuple[np.ndarray, np.ndarray]]


class MethodLoss(nn.Module):
    """Base class: subclasses implement ``forward``; hooks default to doing nothing."""

    #: ``neighbours(label) -> Sequence[int]``: classes to sample next to ``label`` in a P×K
    #: batch (HTL defines it as a method). ``None``: the sampler's own group and category
    #: neighbours.
    neighbours: Callable[[int], Sequence[int]] | None = None

    def forward(self, batch: TrainBatch) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, context: EpochContext) -> None:
        return None

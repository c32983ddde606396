"""OS+IS: an object (category) classification loss and an instance similarity loss.

Park, Shin, Choi, Kim, "Study on Fashion Image Retrieval Methods for Efficient Fashion Visual
Search", CVPR Workshops (FFSS-USAD) 2019. Their best model is DenseNet121+OS+IS.

One backbone feeds two loss paths:

- **OS** (object/category classification): the backbone features pass through a *feature
  relaxation module* (FRM: 1×1 conv → ReLU → dropout → 1×1 conv) and a linear category
  classifier trained with cross-entropy. The FRM loosens the feature distribution the
  classifier sees, so that the category loss and the instance loss, which want different
  shapes of the embedding space, do not fight over the same features.
- **IS** (instance similarity): a triplet loss with online mining on the L2-normalised
  embeddings, so that images of the same item are closer than images of other items.

The FRM and the classifier belong to this loss module (like a pytorch-metric-learning loss
with weights) and lie on the OS path only: the IS path never goes through them, and the
embeddings used for retrieval never do either. Rows whose category is unknown (``-1``) are
left out of the OS term; a batch with no known category has an OS term of 0.

``total = os_weight * OS + is_weight * IS``; parts ``os``, ``is`` and ``os_accuracy`` (the
category accuracy on the known rows, NaN when the batch has none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss
from vestis.losses.triplet import TripletLoss

UNKNOWN_CATEGORY = -1


class FeatureRelaxation(nn.Module):
    """FRM: 1×1 conv → ReLU → dropout → 1×1 conv, on pooled vectors or on feature maps.

    ``(B, C)`` vectors are treated as ``(B, C, 1, 1)`` maps, where a 1×1 convolution is a
    linear layer; ``(B, C, H, W)`` maps are relaxed per position and then globally average
    pooled. Either way the output is ``(B, out_channels)``, with the same weights.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 512,
        out_channels: int | None = None,
        dropout: float = 0.5,
    ):
        super().__init__()
        _check_positive(in_channels=in_channels, hidden_channels=hidden_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        out_channels = in_channels if out_channels is None else out_channels
        _check_positive(out_channels=out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(hidden_channels, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        maps = _as_maps(features, self.in_channels)
        relaxed = self.conv2(self.dropout(self.relu(self.conv1(maps))))
        return relaxed.mean(dim=(2, 3))


def _as_maps(features: torch.Tensor, channels: int) -> torch.Tensor:
    """``(B, C)`` → ``(B, C, 1, 1)``; ``(B, C, H, W)`` as is; anything else is refused."""
    if features.dim() == 2:
        features = features[:, :, None, None]
    if features.dim() != 4 or features.shape[1] != channels:
        raise ValueError(
            f"expected features of shape (B, {channels}) or (B, {channels}, H, W), "
            f"got {tuple(features.shape)}"
        )
    return features


def _check_positive(**sizes: int) -> None:
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {size}")


def category_loss(
    logits: torch.Tensor, categories: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Cross-entropy and accuracy over the rows of known category (``-1`` = unknown).

    With no known row the loss is a zero that still backpropagates (to zero gradients), and
    the accuracy is NaN.
    """
    known = categories != UNKNOWN_CATEGORY
    if not bool(known.any()):
        return logits.sum() * 0.0, float("nan")
    loss = F.cross_entropy(
        logits, categories, ignore_index=UNKNOWN_CATEGORY, label_smoothing=label_smoothing
    )
    hits = logits[known].argmax(dim=1) == categories[known]
    return loss, float(hits.float().mean())


@register_loss("os_is")
class OSISLoss(MethodLoss):
    """``os_weight * OS + is_weight * IS``: see the module docstring."""

    def __init__(
        self,
        *,
        num_categories: int,
        feature_dim: int,
        os_weight: float = 1.0,
        is_weight: float = 1.0,
        margin: float = 0.2,
        mining: str = "batch-hard",
        relax_hidden: int = 512,
        relax_dropout: float = 0.5,
        label_smoothing: float = 0.0,
        num_labels: int | None = None,
        embed_dim: int | None = None,
    ):
        super().__init__()
        _check_config(num_categories, os_weight, is_weight, label_smoothing)
        self.num_categories = num_categories
        self.os_weight = os_weight
        self.is_weight = is_weight
        self.label_smoothing = label_smoothing
        self.relaxation = FeatureRelaxation(
            feature_dim, hidden_channels=relax_hidden, dropout=relax_dropout
        )
        self.classifier = nn.Linear(feature_dim, num_categories)
        self.triplet = TripletLoss(margin=margin, mining=mining)

    def category_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The OS path: features (vectors or maps) → FRM → category logits."""
        return self.classifier(self.relaxation(features))

    def os_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, float]:
        self._check_categories(batch.categories)
        logits = self.category_logits(batch.features)
        return category_loss(logits, batch.categories, self.label_smoothing)

    def is_loss(self, batch: TrainBatch) -> torch.Tensor:
        return self.triplet(F.normalize(batch.embeddings, dim=1), batch.labels)

    def forward(self, batch: TrainBatch) -> LossOutput:
        os_term, accuracy = self.os_loss(batch)
        is_term = self.is_loss(batch)
        total = self.os_weight * os_term + self.is_weight * is_term
        parts = {
            "os": float(os_term.detach()),
            "is": float(is_term.detach()),
            "os_accuracy": accuracy,
        }
        return LossOutput(total, parts)

    def _check_categories(self, categories: torch.Tensor) -> None:
        bad = (categories < UNKNOWN_CATEGORY) | (categories >= self.num_categories)
        if bool(bad.any()):
            raise ValueError(
                f"category codes must be -1 (unknown) or in [0, {self.num_categories}), "
                f"got {sorted(set(categories[bad].tolist()))}"
            )


def _check_config(
    num_categories: int, os_weight: float, is_weight: float, label_smoothing: float
) -> None:
    if num_categories < 2:
        raise ValueError(
            f"os_is needs at least 2 categories for its OS classification loss, "
            f"got num_categories={num_categories}; use the 'triplet' loss when the data has "
            f"no categories"
        )
    if os_weight < 0 or is_weight < 0:
        raise ValueError(f"weights must be >= 0, got os={os_weight}, is={is_weight}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

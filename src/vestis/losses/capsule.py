"""The capsule network's loss: triplet + margin + masked reconstruction.

Kinli, Ozcan, Kirac, "Fashion Image Retrieval with Capsule Networks", ICCV Workshops 2019;
the margin and reconstruction losses are those of Sabour, Frosst, Hinton, "Dynamic Routing
Between Capsules", NeurIPS 2017. The network is :class:`vestis.models.capsnet.CapsNet`.

- **triplet** (retrieval): a triplet loss with online mining on the L2-normalised
  embedding, the flattened class capsules, so that views of one item are closer than other
  items;
- **margin** (one class capsule per category): the length of the true category's capsule
  should be at least ``m_plus``, the others at most ``m_minus``:
  ``L = Σ_k T_k max(0, m⁺ - |v_k|)² + λ (1 - T_k) max(0, |v_k| - m⁻)²``, λ = ``down_weight``
  (0.9, 0.1 and 0.5 in the paper), summed over the categories, averaged over the rows;
- **reconstruction** (regulariser): every class capsule but the true one is masked to zero
  and a decoder (fully connected, ReLU; 512 and 1024 units in the paper; sigmoid output)
  reconstructs the capsule network's input, scaled to [0, 1], from what is left, so that
  the true capsule has to encode the instantiation parameters of what it saw. The loss is
  the sum of squared errors, scaled down by ``reconstruction_weight`` (0.0005 in the paper)
  so that it does not dominate.
  The decoder belongs to this module, like OS+IS's classifier: it is not part of the
  retrieval model.

The model's "adapted" features (``TrainBatch.features``) are the flattened class capsules
followed by the reconstruction target (see :mod:`vestis.models.capsnet`). Rows of unknown
category (``-1``) get only the triplet term. ``total = triplet_weight · triplet +
margin_weight · margin + reconstruction_weight · reconstruction``; parts ``triplet``,
``margin``, ``reconstruction`` (the unscaled sum of squared errors) and
``capsule_accuracy`` (the longest capsule is the true category; NaN with no known row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss
from vestis.losses.triplet import TripletLoss

UNKNOWN_CATEGORY = -1


def margin_loss(lengths: torch.Tensor, categories: torch.Tensor, m_plus: float = 0.9,
                m_minus: float = 0.1, down_weight: float = 0.5) -> torch.Tensor:
    """Sabour et al.'s margin loss of capsule ``lengths`` (B, K), mean over the rows.

    ``categories`` (B,) are in [0, K); the caller leaves out rows of unknown category."""
    present = F.one_hot(categories, lengths.shape[1]).to(lengths.dtype)
    loss = (present * F.relu(m_plus - lengths).pow(2)
            + down_weight * (1 - present) * F.relu(lengths - m_minus).pow(2))
    return loss.sum(dim=1).mean()


def mask_capsules(capsules: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
    """(B, K, D) capsules with all but the ``categories`` one set to zero, flattened (B, K·D)."""
    keep = F.one_hot(categories, capsules.shape[1]).to(capsules.dtype)
    return (capsules * keep.unsqueeze(-1)).flatten(1)


class CapsuleDecoder(nn.Module):
    """Masked class capsules → fully connected ReLU layers → the reconstruction, in (0, 1)."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (512, 1024)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        layers += [nn.Linear(width, out_features), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        return self.layers(masked)


@register_loss("capsule")
class CapsuleLoss(MethodLoss):
    """Triplet + margin + masked reconstruction: see the module docstring."""

    def __init__(
        self,
        *,
        num_categories: int,
        feature_dim: int,
        embed_dim: int,
        capsule_dim: int = 16,
        margin: float = 0.2,
        mining: str = "batch-hard",
        triplet_weight: float = 1.0,
        margin_weight: float = 1.0,
        reconstruction_weight: float = 0.0005,
        m_plus: float = 0.9,
        m_minus: float = 0.1,
        down_weight: float = 0.5,
        decoder_hidden: Sequence[int] = (512, 1024),
        num_labels: int | None = None,
    ):
        super().__init__()
        target_dim = _check_config(num_categories, feature_dim, embed_dim, capsule_dim,
                                   reconstruction_weight, (triplet_weight, margin_weight))
        if not 0.0 <= m_minus < m_plus <= 1.0:
            raise ValueError(f"need 0 <= m_minus < m_plus <= 1, got {m_minus}, {m_plus}")
        self.num_categories, self.capsule_dim = num_categories, capsule_dim
        self.weights = (triplet_weight, margin_weight, reconstruction_weight)
        self.margins = (m_plus, m_minus, down_weight)
        self.triplet = TripletLoss(margin=margin, mining=mining)
        self.decoder = (CapsuleDecoder(embed_dim, target_dim, decoder_hidden)
                        if reconstruction_weight > 0 else None)

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class capsules (B, K, D) and the reconstruction target (B, T) of the features."""
        size = self.num_categories * self.capsule_dim
        capsules = features[:, :size].reshape(len(features), self.num_categories,
                                                self.capsule_dim)
        return capsules, features[:, size:]

    def reconstruction_error(self, capsules: torch.Tensor, categories: torch.Tensor,
                             target: torch.Tensor) -> torch.Tensor:
        """Sum of squared errors of the decoder fed only the true class capsule, mean over rows."""
        reconstruction = self.decoder(mask_capsules(capsules, categories))
        return (reconstruction - target).pow(2).sum(dim=1).mean()

    def forward(self, batch: TrainBatch) -> LossOutput:
        triplet = self.triplet(F.normalize(batch.embeddings, dim=1), batch.labels)
        capsules, target = self.split(batch.features)
        known = batch.categories != UNKNOWN_CATEGORY
        zero = capsules.sum() * 0.0  # keeps the graph when no row has a known category
        margin = reconstruction = zero
        accuracy = float("nan")
        if bool(known.any()):
            lengths = capsules[known].norm(dim=-1)
            margin = margin_loss(lengths, batch.categories[known], *self.margins)
            accuracy = float((lengths.argmax(dim=1) == batch.categories[known]).float().mean())
            if self.decoder is not None:
                reconstruction = self.reconstruction_error(
                    capsules[known], batch.categories[known], target[known])
        w_triplet, w_margin, w_reconstruction = self.weights
        total = w_triplet * triplet + w_margin * margin + w_reconstruction * reconstruction
        parts = {"triplet": float(triplet.detach()), "margin": float(margin.detach()),
                 "reconstruction": float(reconstruction.detach()), "capsule_accuracy": accuracy}
        return LossOutput(total, parts)


def _check_config(num_categories: int, feature_dim: int, embed_dim: int, capsule_dim: int,
                  reconstruction_weight: float, weights: tuple[float, float]) -> int:
    """The reconstruction target's width, once the sizes and weights are checked."""
    if num_categories < 2:
        raise ValueError(f"the capsule loss needs at least 2 categories (one class capsule "
                         f"each), got num_categories={num_categories}")
    if embed_dim != num_categories * capsule_dim:
        raise ValueError(f"embed_dim {embed_dim} is not num_categories × capsule_dim = "
                         f"{num_categories} × {capsule_dim}: the capsule loss needs capsnet's "
                         f"flattened class capsules, with capsule_dim = the model's class_dim")
    if min(*weights, reconstruction_weight) < 0:
        raise ValueError(f"loss weights must be >= 0, got {[*weights, reconstruction_weight]}")
    target_dim = feature_dim - embed_dim
    if reconstruction_weight > 0 and target_dim < 1:
        raise ValueError("the reconstruction loss needs a target after the capsules in the "
                         "features (capsnet's pooled entry map); set reconstruction_weight: 0")
    return target_dim

"""FashionNet's joint loss: triplet + category + attributes + landmarks.

Liu et al. (CVPR 2016) train FashionNet with four losses at once: a triplet loss on the
retrieval embedding, a softmax cross-entropy on the category, a cross-entropy per attribute
and the landmark loss (location + visibility). Each term is used when the batch has its
targets, and weighs its own weight:

- ``triplet``: :class:`vestis.losses.TripletLoss` on the normalised embeddings (always);
- ``category_ce``: a linear classifier on the head's features, cross-entropy over the
  samples with a known category (``-1`` is unknown); 0 without categories;
- ``attribute_bce``: a linear layer of ``attributes`` outputs, binary cross-entropy over the
  known entries of ``batch.attributes`` (``-1`` unknown); 0 when the batch carries none;
- ``landmark``: :class:`vestis.losses.LandmarkLoss` when the batch carries both a landmark
  prediction and its target.

In :mod:`vestis.train` the retrieval batches come from shop photos without landmark
targets, so the landmark term is trained in its own stage first (on CCP masks,
``model.landmark_pretrain``) with the same :class:`LandmarkLoss`, before the features
pooled at the predicted landmarks are cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.landmark import LandmarkLoss
from vestis.losses.registry import register_loss
from vestis.losses.triplet import TripletLoss


@register_loss("fashionnet")
class FashionNetLoss(MethodLoss):
    """The joint loss (see the module). Parameters: ``margin`` and ``mining`` of the triplet
    term, ``category_weight``, ``attributes`` (how many; 0: no attribute term),
    ``attribute_weight``, ``landmark_weight``."""

    def __init__(self, margin: float = 0.2, mining: str = "batch-hard",
                 category_weight: float = 1.0, attributes: int = 0,
                 attribute_weight: float = 1.0, landmark_weight: float = 1.0,
                 num_categories: int = 0, feature_dim: int = 0, **_dims):
        super().__init__()
        self.triplet = TripletLoss(margin=margin, mining=mining)
        self.category_weight, self.attribute_weight = category_weight, attribute_weight
        self.landmark_weight = landmark_weight
        self.classifier = nn.Linear(feature_dim, num_categories) if num_categories else None
        self.attribute_head = nn.Linear(feature_dim, attributes) if attributes else None
        self.landmark = LandmarkLoss()

    def forward(self, batch: TrainBatch) -> LossOutput:
        triplet = self.triplet(F.normalize(batch.embeddings, dim=1), batch.labels)
        total, parts = triplet, {"triplet": float(triplet.detach())}
        for name, weight, term in (("category_ce", self.category_weight, self._category),
                                   ("attribute_bce", self.attribute_weight, self._attributes)):
            value = term(batch)
            if value is not None:
                total = total + weight * value
                parts[name] = float(value.detach())
        if batch.landmark_prediction is not None and batch.landmark_target is not None:
            value, landmark_parts = self.landmark(batch.landmark_prediction,
                                                  batch.landmark_target)
            total = total + self.landmark_weight * value
            parts.update(landmark_parts)
        return LossOutput(total, parts)

    def _category(self, batch: TrainBatch) -> torch.Tensor | None:
        known = batch.categories >= 0
        if self.classifier is None or not known.any():
            return None
        logits = self.classifier(batch.features[known])
        return F.cross_entropy(logits, batch.categories[known])

    def _attributes(self, batch: TrainBatch) -> torch.Tensor | None:
        if self.attribute_head is None or batch.attributes is None:
            return None
        known = batch.attributes >= 0
        if not known.any():
            return None
        logits = self.attribute_head(batch.features)
        return F.binary_cross_entropy_with_logits(logits[known], batch.attributes[known].float())

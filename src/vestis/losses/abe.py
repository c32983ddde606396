"""ABE-M's loss: a contrastive loss on each learner plus the divergence loss between learners.

Kim, Goyal, Chawla, Lee, Kwon, "Attention-based Ensemble for Deep Metric Learning",
ECCV 2018.

The embedding of :class:`vestis.models.abe.ABENet` (or of the M-heads baseline) is the
concatenation of M learners; the loss cuts it back into M equal groups (``learners``) and
L2-normalises each.

- **Metric loss**: each learner has its own contrastive loss on all pairs of the batch,
  on cosine similarity s: ``[m_pos - s]_+`` on positive pairs, ``[s - m_neg]_+`` on negative
  ones, each averaged over its non-zero terms (pytorch-metric-learning's
  ``ContrastiveLoss``); the learners' losses are averaged.
- **Divergence loss**: the learners should be diverse, so the M embeddings of *one* image
  are pushed apart: ``L_div = mean over images and pairs m ≠ n of
  [m_div - ‖e_m(x) - e_n(x)‖²]_+``. With unit vectors ``‖e_m - e_n‖² = 2 - 2 cos``, so the
  default ``m_div = 1`` is satisfied once two learners' cosine is at most 0.5. Without it
  ABE's attention masks, and so its learners, end up alike; M-heads hardly needs it.

``total = metric + λ · L_div`` with ``λ = 1`` (the paper's best value). The margins are
this implementation's defaults. Parts: ``contrastive``, ``divergence`` and
``learner_similarity`` (the mean cosine between two learners' embeddings of one image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses
from pytorch_metric_learning.distances import CosineSimilarity

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss


@register_loss("abe")
class ABELoss(MethodLoss):
    """Contrastive loss per learner + ``divergence_weight`` × the learners' divergence loss."""

    def __init__(
        self,
        learners: int = 4,
        divergence_weight: float = 1.0,
        divergence_margin: float = 1.0,
        pos_margin: float = 0.8,
        neg_margin: float = 0.4,
        *,
        embed_dim: int | None = None,
        **_dims,
    ):
        super().__init__()
        if learners < 2:
            raise ValueError(f"learners must be at least 2, got {learners}")
        if embed_dim is not None and embed_dim % learners:
            raise ValueError(f"embed_dim {embed_dim} does not split into {learners} learners")
        if divergence_weight < 0 or not 0 < divergence_margin <= 4:
            raise ValueError("need divergence_weight >= 0 and 0 < divergence_margin <= 4 "
                             f"(squared distance of unit vectors), got {divergence_weight}, "
                             f"{divergence_margin}")
        if not -1.0 <= neg_margin < pos_margin <= 1.0:
            raise ValueError(f"need -1 <= neg_margin < pos_margin <= 1: {neg_margin}, {pos_margin}")
        self.learners = int(learners)
        self.divergence_weight, self.divergence_margin = divergence_weight, divergence_margin
        self.contrastive = losses.ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, distance=CosineSimilarity())

    def forward(self, batch: TrainBatch) -> LossOutput:
        learners = self.learner_embeddings(batch.embeddings)
        metric = torch.stack([self.contrastive(e, batch.labels) for e in learners]).mean()
        divergence = self.divergence(learners)
        total = metric + self.divergence_weight * divergence
        return LossOutput(total, {
            "contrastive": float(metric.detach()),
            "divergence": float(divergence.detach()),
            "learner_similarity": learner_similarity(learners),
        })

    def learner_embeddings(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """The M learners' L2-normalised embeddings, cut from the concatenation."""
        if embeddings.shape[1] % self.learners:
            raise ValueError(f"{embeddings.shape[1]}-d embeddings do not split into "
                             f"{self.learners} learners")
        return [F.normalize(e, dim=1) for e in embeddings.chunk(self.learners, dim=1)]

    def divergence(self, learners: list[torch.Tensor]) -> torch.Tensor:
        """``[m_div - ‖e_m(x) - e_n(x)‖²]_+`` averaged over images and learner pairs m < n."""
        stacked = torch.stack(learners, dim=1)  # (B, M, D)
        # unit vectors: ‖a - b‖² = 2 - 2 a·b, which (unlike a distance) has a gradient at a = b
        distances = 2 - 2 * stacked @ stacked.transpose(1, 2)  # (B, M, M)
        m, n = torch.triu_indices(self.learners, self.learners, offset=1)
        return F.relu(self.divergence_margin - distances[:, m, n]).mean()


def learner_similarity(learners: list[torch.Tensor]) -> float:
    """Mean cosine between different learners' (normalised) embeddings of the same image."""
    stacked = torch.stack([e.detach() for e in learners], dim=1)
    cosines = stacked @ stacked.transpose(1, 2)
    count = len(learners)
    return float((cosines.sum() - cosines.diagonal(dim1=1, dim2=2).sum())
                 / (len(stacked) * count * (count - 1)))

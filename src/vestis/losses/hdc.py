"""HDC: hard-aware deeply cascaded embedding, a contrastive loss per stage on a cascade of pairs.

Yuan, Yang, Zhang, "Hard-Aware Deeply Cascaded Embedding", ICCV 2017.

A complex model over-fits the many easy pairs, a simple one finds most pairs hard. HDC
cascades K models of increasing depth (:class:`vestis.models.cascade.HDCNet`) and lets
each one handle the pairs it suits:

1. Stage 1, the shallow cheap model, takes every pair of the batch (positive: same label;
   negative: different labels) and has a contrastive loss on the cosine similarities of its
   L2-normalised embedding: ``[m_pos - s]_+`` on positive pairs, ``[s - m_neg]_+`` on
   negative ones, each averaged over its non-zero terms (pytorch-metric-learning's
   ``ContrastiveLoss``).
2. The pairs stage k finds hard are passed on, and only those: stage k+1's loss sees just
   them, stage k+1 passes on those of them that it finds hard, and so on, until the last
   stage or until no pair is left.
3. ``total`` is the mean of the stages' losses; everything trains together.

"Hard" (``hard_fraction``): by default a pair is hard for a stage when the stage has not
separated it, i.e. its contrastive term is non-zero (a positive pair below ``pos_margin``,
a negative pair above ``neg_margin``), so easy pairs leave the cascade early. With a
fraction ``f``, a stage instead passes on the hardest ``f`` of its positive pairs (lowest
similarity) and of its negative pairs (highest), whether separated or not, with
pytorch-metric-learning's ``HDCMiner``. The margins (0.8 and 0.4 on cosine similarity) are
this implementation's defaults, not the paper's.

Parts: ``stage_k`` (stage k's loss) and ``stage_k_pairs`` (how many ordered pairs it saw).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss

# (anchors of positive pairs, positives, anchors of negative pairs, negatives)
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@register_loss("hdc")
class HDCLoss(MethodLoss):
    """Contrastive losses on a cascade of ever harder pairs, one per group of ``stage_dims``."""

    def __init__(
        self,
        stage_dims: Sequence[int] = (64, 64, 128),
        pos_margin: float = 0.8,
        neg_margin: float = 0.4,
        hard_fraction: float | None = None,
        *,
        embed_dim: int | None = None,
        **_dims,
    ):
        super().__init__()
        self.stage_dims = tuple(int(d) for d in stage_dims)
        if not self.stage_dims or min(self.stage_dims) < 1:
            raise ValueError(f"stage_dims must list positive sizes, got {list(stage_dims)}")
        if embed_dim is not None and sum(self.stage_dims) != embed_dim:
            raise ValueError(f"stage_dims {list(self.stage_dims)} sum to "
                             f"{sum(self.stage_dims)}, not embed_dim {embed_dim}")
        if not -1.0 <= neg_margin < pos_margin <= 1.0:
            raise ValueError(f"need -1 <= neg_margin < pos_margin <= 1: {neg_margin}, {pos_margin}")
        if hard_fraction is not None and not 0.0 < hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.hard_fraction = hard_fraction
        self.contrastive = losses.ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, distance=CosineSimilarity()
        )
        self.miner = None if hard_fraction is None else miners.HDCMiner(
            filter_percentage=hard_fraction, distance=CosineSimilarity()
        )

    def forward(self, batch: TrainBatch) -> LossOutput:
        stages = self.stage_embeddings(batch.embeddings)
        pairs = lmu.get_all_pairs_indices(batch.labels)
        stage_losses, parts = [], {}
        for k, embeddings in enumerate(stages, start=1):
            loss = self.contrastive(embeddings, batch.labels, pairs)
            stage_losses.append(loss)
            parts[f"stage_{k}"] = float(loss.detach())
            parts[f"stage_{k}_pairs"] = float(len(pairs[0]) + len(pairs[2]))
            pairs = self.pass_hard(embeddings.detach(), batch.labels, pairs)
        total = torch.stack(stage_losses).mean()
        return LossOutput(total, {"hdc": float(total.detach()), **parts})

    def stage_embeddings(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's L2-normalised embedding, cut from the concatenated embedding."""
        if embeddings.shape[1] != sum(self.stage_dims):
            raise ValueError(f"embeddings have {embeddings.shape[1]} dims, "
                             f"stage_dims {list(self.stage_dims)}")
        return [F.normalize(x, dim=1) for x in embeddings.split(self.stage_dims, dim=1)]

    def pass_hard(self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: Pairs) -> Pairs:
        """The pairs among ``pairs`` that the stage of these (normalised) embeddings finds hard."""
        if self.miner is not None:
            self.miner.set_idx_externally(pairs, labels)
            hard = self.miner(embeddings, labels)
            self.miner.reset_idx()
            return hard
        anchors, positives, anchors_neg, negatives = pairs
        positive_similarity = (embeddings[anchors] * embeddings[positives]).sum(dim=1)
        negative_similarity = (embeddings[anchors_neg] * embeddings[negatives]).sum(dim=1)
        keep_positive = positive_similarity < self.pos_margin
        keep_negative = negative_similarity > self.neg_margin
        return (anchors[keep_positive], positives[keep_positive],
                anchors_neg[keep_negative], negatives[keep_negative])

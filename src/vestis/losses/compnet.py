"""Comp-Net's losses: cost-sensitive outfit matching and the semantic label loss.

Cost-sensitive minimisation (Dan et al., IJCNN 2018) makes a wrong outfit match cost more.
Here each negative candidate ``n`` of an anchor enters the softmax with its logit raised by
``log(cost[a, n])``: the loss is ``-log(e^{s_p} / (e^{s_p} + sum_n cost_n * e^{s_n}))``.
A shop's "related products" lists are incomplete, so an unlinked candidate may still go
with the anchor; the recipe gives ``1 + beta`` to candidates whose *category pair* never
forms an outfit in the training links (two hoodies), which are certainly wrong, and 1 to the
rest. With ``beta = 0`` this is the plain softmax (InfoNCE) loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CostSensitiveOutfitLoss(nn.Module):
    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, vectors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                cost: torch.Tensor) -> torch.Tensor:
        """``vectors`` (N, D) unit rows; ``positives`` (N, N) bool, a pair that goes together;
        ``negatives`` (N, N) bool, candidates that must rank below each positive; ``cost``
        (N, N) >= 1, the weight of each negative. Averaged over (anchor, positive) pairs."""
        if not positives.any():
            return vectors.sum() * 0.0
        logits = vectors @ vectors.T / self.temperature
        weighted = torch.where(negatives, logits + torch.log(cost.clamp(min=1e-6)),
                               torch.full_like(logits, float("-inf")))
        anchor, positive = positives.nonzero(as_tuple=True)
        pos_logit = logits[anchor, positive]
        neg_lse = torch.logsumexp(weighted[anchor], dim=1)
        return (torch.logaddexp(pos_logit, neg_lse) - pos_logit).mean()


class SemanticLabelLoss(nn.Module):
    """Cross-entropy of each label family against its known values (uniform over them);
    rows with no value in a family are skipped for that family."""

    def __init__(self, slices: Sequence[slice]):
        super().__init__()
        self.slices = list(slices)

    def forward(self, logits: torch.Tensor, multi_hot: torch.Tensor) -> torch.Tensor:
        total, families = logits.sum() * 0.0, 0
        for part in self.slices:
            target = multi_hot[:, part]
            has = target.sum(1) > 0
            if not has.any():
                continue
            target = target[has] / target[has].sum(1, keepdim=True)
            total = total - (target * F.log_softmax(logits[has][:, part], dim=1)).sum(1).mean()
            families += 1
        return total / max(families, 1)

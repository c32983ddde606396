"""Keep what the backbone knows: relational distillation toward ImageNet features.

Fine-tuning on one shop's look moves the embedding away from the ImageNet space, which is
what transfers to shops never seen. This term keeps the *relations* of a batch (its cosine
similarity matrix) close to those of the frozen ImageNet features of the same views, while
the metric loss moves the instances it was given (relational knowledge distillation, Park
et al. 2019, with cosine similarities). The student may rotate and rescale freely: only
similarities are compared, so the two spaces need not share a dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RelationalDistillation(nn.Module):
    """Mean squared difference of the student's and the teacher's cosine similarity
    matrices over one batch."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if len(student) != len(teacher):
            raise ValueError(f"student and teacher batches differ: {len(student)} vs "
                             f"{len(teacher)}")
        s, t = F.normalize(student, dim=1), F.normalize(teacher.detach(), dim=1)
        return F.mse_loss(s @ s.T, t @ t.T)

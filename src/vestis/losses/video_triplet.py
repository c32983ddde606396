"""Unsupervised video triplets ("Watch fashion shows to tell clothing attributes", 2017).

Garment crops of one clip (one track: the same garment seen over time, sampled 25 frames
apart) are an instance: anchor and positive come from the same clip, the negative from
another clip. As in the paper, negatives are drawn **at random** first; once training has
converged on those (the previous epoch's mean loss under ``converged_loss``, or at epoch
``hard_from_epoch``), each anchor-positive pair is trained against the **top-k hardest**
negatives of its batch (``hardest``, 4 in the paper). The switch is kept in the loss's state,
so ``--resume`` continues in the same phase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vestis.losses.base import EpochContext, LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss


@register_loss("video_triplet")
class VideoTripletLoss(MethodLoss):
    def __init__(self, margin: float = 0.2, hardest: int = 4, converged_loss: float = 0.05,
                 hard_from_epoch: int | None = None, seed: int = 0, **_dims):
        super().__init__()
        if margin <= 0 or hardest < 1:
            raise ValueError("margin must be positive and hardest at least 1")
        self.margin, self.hardest = margin, hardest
        self.converged_loss, self.hard_from_epoch = converged_loss, hard_from_epoch
        self.register_buffer("hard_phase", torch.tensor(False))
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_sum, self._epoch_steps = 0.0, 0

    @property
    def hard(self) -> bool:
        return bool(self.hard_phase)

    def on_epoch_start(self, epoch: int, context: EpochContext) -> None:
        converged = self._epoch_steps and self._epoch_sum / self._epoch_steps < self.converged_loss
        reached = self.hard_from_epoch is not None and epoch >= self.hard_from_epoch
        if converged or reached:
            self.hard_phase.fill_(True)
        self._epoch_sum, self._epoch_steps = 0.0, 0

    def forward(self, batch: TrainBatch) -> LossOutput:
        vectors = F.normalize(batch.embeddings, dim=1)
        similarity = vectors @ vectors.T
        labels = batch.labels
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        anchor, positive = (same & ~eye).nonzero(as_tuple=True)
        if not len(anchor):
            zero = batch.embeddings.sum() * 0.0
            return LossOutput(zero, {"video_triplet": 0.0, "hard": float(self.hard)})
        negative_mask = ~same[anchor]
        s_ap = similarity[anchor, positive][:, None]
        s_an = similarity[anchor].masked_fill(~negative_mask, float("-inf"))
        if self.hard:
            k = min(self.hardest, int(negative_mask.sum(1).min()))
            chosen = s_an.topk(k, dim=1).values
        else:
            chosen = s_an.gather(1, self._random_negative(negative_mask)[:, None])
        loss = F.relu(chosen - s_ap + self.margin).mean()
        self._epoch_sum += float(loss.detach())
        self._epoch_steps += 1
        return LossOutput(loss, {"video_triplet": float(loss.detach()), "hard": float(self.hard)})

    def _random_negative(self, negative_mask: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(negative_mask.shape, generator=self.generator)
        return noise.to(negative_mask.device).masked_fill(~negative_mask, -1.0).argmax(dim=1)

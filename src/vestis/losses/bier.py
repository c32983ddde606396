"""BIER: boosting independent embeddings robustly, trained by online gradient boosting.

Opitz, Waltner, Possegger, Bischof, "BIER - Boosting Independent Embeddings Robustly",
ICCV 2017.

One large embedding over-fits and its dimensions are highly correlated. BIER splits the
embedding layer into M groups, the *learners* (:class:`vestis.models.bier.BIERNet`), and
trains them as a boosted ensemble inside each batch:

1. Every pair (i, j ≠ i) of the batch is an example; learner m's similarity is the cosine
   ``s_m(i, j)`` of its L2-normalised group.
2. Each learner has a binomial-deviance loss on its similarities,
   ``ℓ(s, y) = log(1 + exp(-α (s - β) c_y))``, with ``c_y = 1`` for positive pairs and
   ``-C`` for negative ones (the cost that counters their larger number). Positive and
   negative pairs are balanced: each kind's pair weights sum to 1.
3. Online gradient boosting: learner 1 weighs every pair 1. After learner m, the ensemble's
   cumulative response is ``S_m = (1 - η_m) S_{m-1} + η_m s_m`` with the shrinkage
   ``η_m = 2/(m+1)``, and learner m+1 weighs each pair by the negative gradient of the loss
   at that response, ``w_{m+1} = -∂ℓ/∂z = σ(-α (S_m - β) c_y)`` (``z`` the deviance's
   argument): near 1 for pairs the learners so far got wrong (a positive pair with a low
   similarity, a negative pair with a high one), near 0 for pairs they got right. The
   weights are constants (no gradient flows through them).
4. ``total = (1/M) Σ_m Σ_pairs (pair weight) · w_m · ℓ(s_m, y)``: all learners update
   together, in one backward pass.

At test time the ensemble's prediction ``S_M`` is a weighted sum of the learners' cosines,
which :class:`vestis.models.bier.BIERNet` turns into one unit vector. The learners start
independent thanks to :meth:`vestis.models.bier.BIERNet.init_head`.

Defaults ``α = 2``, ``β = 0.5``, ``C = 25`` are the paper's. Parts: ``bier`` (the loss),
``learner_m`` (each learner's weighted loss) and ``boost_weight`` (the mean weight the last
learner gives to the batch's pairs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vestis.losses.base import LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss
from vestis.models.bier import DEFAULT_GROUPS, check_groups


def shrinkage(m: int) -> float:
    """``η_m = 2/(m+1)`` for learner m = 1, 2, ...: the step of the cumulative response."""
    return 2.0 / (m + 1)


@register_loss("bier")
class BIERLoss(MethodLoss):
    """Boosted binomial deviance over the learners ``groups`` of the embedding."""

    def __init__(
        self,
        groups: Sequence[int] = DEFAULT_GROUPS,
        alpha: float = 2.0,
        beta: float = 0.5,
        negative_cost: float = 25.0,
        *,
        embed_dim: int | None = None,
        **_dims,
    ):
        super().__init__()
        self.groups = check_groups(groups, embed_dim)
        if alpha <= 0 or negative_cost <= 0:
            raise ValueError(f"alpha and negative_cost must be positive: {alpha}, {negative_cost}")
        self.alpha, self.beta, self.negative_cost = alpha, beta, negative_cost

    def forward(self, batch: TrainBatch) -> LossOutput:
        similarities = self.similarities(batch.embeddings)
        same = batch.labels[:, None] == batch.labels[None, :]
        pairs = balanced_pair_weights(same)
        boosting = self.boosting_weights([s.detach() for s in similarities], same)
        learner_losses = [
            (pairs * weights * self.deviance(s, same)).sum()
            for s, weights in zip(similarities, boosting, strict=True)
        ]
        total = torch.stack(learner_losses).mean()
        parts = {"bier": float(total.detach())}
        parts.update({f"learner_{m}": float(loss.detach())
                      for m, loss in enumerate(learner_losses, start=1)})
        parts["boost_weight"] = float(boosting[-1][pairs > 0].mean()) if (pairs > 0).any() \
            else 0.0
        return LossOutput(total, parts)

    def similarities(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """(B, B) cosine similarities of each learner's group of the embedding."""
        if embeddings.shape[1] != sum(self.groups):
            raise ValueError(f"embeddings have {embeddings.shape[1]} dims, groups {self.groups}")
        learners = [F.normalize(x, dim=1) for x in embeddings.split(self.groups, dim=1)]
        return [x @ x.T for x in learners]

    def cost(self, same: torch.Tensor) -> torch.Tensor:
        """``c_y``: 1 on positive pairs, ``-C`` on negative ones."""
        return torch.where(same, 1.0, -self.negative_cost)

    def deviance(self, similarity: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """Binomial deviance ``log(1 + exp(-α (s - β) c_y))`` of every pair."""
        return F.softplus(-self.alpha * (similarity - self.beta) * self.cost(same))

    def boosting_weights(
        self, similarities: Sequence[torch.Tensor], same: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each learner's (B, B) pair weights: 1 for the first, then ``σ(-α (S_m - β) c_y)``."""
        weights = [torch.ones_like(similarities[0])]
        response = torch.zeros_like(similarities[0])
        for m, similarity in enumerate(similarities[:-1], start=1):
            response = cumulative_response(response, similarity, m)
            weights.append(torch.sigmoid(-self.alpha * (response - self.beta) * self.cost(same)))
        return weights


def cumulative_response(previous: torch.Tensor, similarity: torch.Tensor, m: int) -> torch.Tensor:
    """``S_m = (1 - η_m) S_{m-1} + η_m s_m``: the ensemble's response after learner m."""
    eta = shrinkage(m)
    return (1.0 - eta) * previous + eta * similarity


def balanced_pair_weights(same: torch.Tensor) -> torch.Tensor:
    """(B, B): 1/#positives on positive pairs, 1/#negatives on negative ones, 0 on i == j."""
    off_diagonal = ~torch.eye(len(same), dtype=torch.bool, device=same.device)
    positive, negative = same & off_diagonal, ~same
    weights = positive / positive.sum().clamp_min(1) + negative / negative.sum().clamp_min(1)
    return weights.float()

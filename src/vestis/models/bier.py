"""BIER's embedding network: one embedding layer whose groups of units are independent learners.

Opitz, Waltner, Possegger, Bischof, "BIER - Boosting Independent Embeddings Robustly",
ICCV 2017.

The embedding layer (here 512 units) is cut into M non-overlapping groups, the *learners*
(the paper's 96 + 160 + 256). They share everything below the embedding layer and are
trained together by online gradient boosting (:mod:`vestis.losses.bier`). This module holds
what the network itself does:

- **the ensemble at retrieval time**: boosting with rates ``η_m = 2/(m+1)`` predicts the
  similarity ``s_M = Σ_m c_m s_m``, ``c_m = 2m / (M(M+1))``, where ``s_m`` is the cosine
  similarity of learner m (:func:`ensemble_weights`). :meth:`BIERNet.head` concatenates the
  L2-normalised groups, each scaled by ``√c_m``: a unit vector whose dot products are
  exactly ``s_M``, so the index and search code need no special case;
- **the independence initialisation** (:meth:`BIERNet.init_head`): learners drawn at random
  from the same features are correlated, and boosting cannot make them diverse if
  they start alike. The paper therefore initialises the embedding weights before training,
  with no extra parameters, by minimising (by gradient descent) the correlation between
  different learners' outputs on the training data, each unit's weight vector held at a
  fixed length. Here the objective is the learners' cross-covariance, whose global minimum,
  zero, :func:`decorrelate_groups` reaches in closed form: a block Gram-Schmidt of the
  learners' weight rows in the metric of the inputs' covariance (learner m is made
  covariance-orthogonal to learners 1..m-1 by the smallest change of its rows), after which
  each row gets back its norm. :func:`cross_learner_correlation` measures what it removes.
  It needs more training images than the embedding layer has inputs (the adapter's width),
  or the learners cannot all be independent on them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vestis.models.registry import register_model
from vestis.models.retrieval_net import RetrievalNet

DEFAULT_GROUPS = (96, 160, 256)


def check_groups(groups: Sequence[int], embed_dim: int | None = None) -> tuple[int, ...]:
    """The learners' sizes as a tuple; refused unless ≥ 2 positive sizes summing to embed_dim."""
    sizes = tuple(int(size) for size in groups)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"groups must list at least two positive learner sizes, got {groups}")
    if embed_dim is not None and sum(sizes) != embed_dim:
        raise ValueError(f"groups {list(sizes)} sum to {sum(sizes)}, not embed_dim {embed_dim}")
    return sizes


def ensemble_weights(learners: int) -> torch.Tensor:
    """``c_m = 2m / (M(M+1))``: learner m's share of the boosted similarity (they sum to 1)."""
    m = torch.arange(1, learners + 1, dtype=torch.float64)
    return (2 * m / (learners * (learners + 1))).float()


class BIERNet(RetrievalNet):
    """Backbone → pooled levels → (adapter) → embedding layer split into learners ``groups``.

    ``head`` returns the weighted concatenation of the L2-normalised learners (see the module
    docstring), so its "embedding" is already a unit vector; a loss cuts it back into the
    learners with ``groups``. ``init_head`` decorrelates the learners from training features.
    """

    architecture = "bier_net"

    def __init__(
        self,
        groups: Sequence[int] = DEFAULT_GROUPS,
        embed_dim: int | None = None,
        pretrained: bool = True,
        **kwargs,
    ):
        sizes = check_groups(groups, embed_dim)
        super().__init__(embed_dim=sum(sizes), pretrained=pretrained, **kwargs)
        self.groups = sizes
        self.config["groups"] = list(sizes)
        self.register_buffer("group_scales", ensemble_weights(len(sizes)).sqrt(),
                             persistent=False)

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adapted = self.adapter(features)
        learners = self.projection(adapted).split(self.groups, dim=1)
        scaled = [F.normalize(x, dim=1) * scale
                  for x, scale in zip(learners, self.group_scales, strict=True)]
        return adapted, torch.cat(scaled, dim=1)

    @torch.no_grad()
    def init_head(self, features: torch.Tensor) -> None:
        """BIER's independence initialisation, from (N, feature_dim) training features.

        The trainer calls it once, before the first epoch of a new run."""
        inputs = self._projection_inputs(features)
        weight = decorrelate_groups(self.projection.weight, inputs, self.groups)
        self.projection.weight.copy_(weight)

    def _projection_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """The adapter's output as training sees it (batch statistics), leaving its state be."""
        state = copy.deepcopy(self.adapter.state_dict())
        was_training = self.adapter.training
        self.adapter.train()
        inputs = self.adapter(features)
        self.adapter.load_state_dict(state)
        self.adapter.train(was_training)
        return inputs


def decorrelate_groups(
    weight: torch.Tensor, inputs: torch.Tensor, groups: Sequence[int], ridge: float = 1e-3
) -> torch.Tensor:
    """Weight rows of each group made covariance-orthogonal to the groups before it.

    ``weight`` is (sum(groups), D), ``inputs`` (N, D). Group m's rows ``W_m`` become
    ``W_m - A P`` with ``P`` the (already treated) rows of groups 1..m-1 and ``A`` solving
    ``(W_m - A P) Σ Pᵀ = 0``, Σ the inputs' covariance plus ``ridge`` × its mean variance
    (so few samples or dead inputs leave the system solvable). Each row then gets back its
    original norm. The first group is unchanged.
    """
    covariance = _covariance(inputs.double(), ridge)
    blocks = weight.detach().double().split(list(groups))
    done: list[torch.Tensor] = [blocks[0]]
    for block in blocks[1:]:
        previous = torch.cat(done)
        gram = previous @ covariance @ previous.T
        coefficients = torch.linalg.solve(gram, previous @ covariance @ block.T).T
        moved = block - coefficients @ previous
        norms = block.norm(dim=1, keepdim=True) / moved.norm(dim=1, keepdim=True).clamp_min(1e-12)
        done.append(moved * norms)
    return torch.cat(done).to(weight.dtype)


def _covariance(inputs: torch.Tensor, ridge: float) -> torch.Tensor:
    centred = inputs - inputs.mean(dim=0)
    covariance = centred.T @ centred / max(1, len(inputs) - 1)
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    identity = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    return covariance + ridge * scale * identity


def cross_learner_correlation(outputs: torch.Tensor, groups: Sequence[int]) -> float:
    """Mean squared Pearson correlation between units of different learners, over N samples.

    ``outputs`` is (N, sum(groups)): the raw embedding-layer outputs. 0 means the learners are
    linearly independent on these samples; units of constant output count as uncorrelated.
    """
    centred = outputs.double() - outputs.double().mean(dim=0)
    unit = centred / centred.norm(dim=0).clamp_min(1e-12)
    correlation = unit.T @ unit
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.as_tensor(list(groups)))
    owner = owner.to(outputs.device)
    across = owner[:, None] != owner[None, :]
    return float(correlation[across].square().mean())


register_model(BIERNet.architecture)(
    lambda pretrained=True, **kw: BIERNet(pretrained=pretrained, **kw)
)

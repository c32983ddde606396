"""HDC's cascade of embeddings taken at increasing depths of the backbone.

Yuan, Yang, Zhang, "Hard-Aware Deeply Cascaded Embedding", ICCV 2017.

HDC ensembles K embedding models of increasing complexity that share one backbone: model k
reads the network at a deeper point than model k-1 (GoogLeNet's inception 3, 4 and 5 in the
paper). Here the backbone's pooled levels (``levels``, shallow to deep, each L2-normalised,
as :class:`vestis.models.RetrievalNet` computes and the trainer caches them) play that part:
stage k ends at level ``stages[k]`` and its head sees every pooled level up to that depth,
so the first stage is a small model of low-level features (colour, texture) and the last one
sees the whole network. Each stage has its own head (an optional adapter
``Linear → BatchNorm → ReLU`` of ``adapter_dim`` units, then a linear embedding of
``stage_dims[k]`` units).

Which samples train which stage is the loss's business (:mod:`vestis.losses.hdc`). The
retrieval vector concatenates the L2-normalised stage embeddings, each scaled by ``1/√K``:
a unit vector whose dot products are the mean of the stages' cosine similarities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.registry import register_model
from vestis.models.retrieval_net import HEAD_LEVEL, RetrievalNet

DEFAULT_LEVELS = (2, 3, 4, HEAD_LEVEL)
DEFAULT_STAGES = (3, 4, HEAD_LEVEL)


def level_depth(level: int | str) -> int:
    """Order of backbone outputs: stage indices 0-6, then the head."""
    return 99 if level == HEAD_LEVEL else int(level)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` units in ``parts`` stages, the last ones one larger when it does not divide."""
    base, extra = divmod(total, parts)
    return [base + (1 if k >= parts - extra else 0) for k in range(parts)]


class HDCNet(RetrievalNet):
    """Backbone → pooled ``levels`` → one embedding head per cascade stage.

    ``stages`` names the level at which each stage ends (shallow to deep); ``stage_dims``
    their embedding sizes (default: ``embed_dim`` split evenly). ``head`` returns the pooled
    features (as the "adapted" features) and the weighted concatenation of the normalised
    stage embeddings.
    """

    architecture = "hdc_net"

    def __init__(
        self,
        levels: Sequence[int | str] = DEFAULT_LEVELS,
        stages: Sequence[int | str] = DEFAULT_STAGES,
        stage_dims: Sequence[int] | None = None,
        embed_dim: int | None = None,
        adapter_dim: int | None = None,
        pretrained: bool = True,
        **kwargs,
    ):
        super().__init__(levels=levels, embed_dim=None, adapter_dim=None, pretrained=pretrained,
                         **kwargs)
        stages = tuple(stages)
        dims = _stage_dims(stage_dims, embed_dim, len(stages))
        self.stage_ends = self._stage_ends(stages)
        self.stage_dims = tuple(dims)
        self.stage_heads = nn.ModuleList(
            _stage_head(end, adapter_dim, dim)
            for end, dim in zip(self.stage_ends, dims, strict=True)
        )
        category_part = self.output_dim - self.embed_dim
        self.embed_dim = sum(dims)
        self.output_dim = self.embed_dim + category_part
        self.config.update(stages=list(stages), stage_dims=list(dims), embed_dim=self.embed_dim,
                           adapter_dim=adapter_dim)

    def _stage_ends(self, stages: tuple) -> tuple[int, ...]:
        """For each stage, how many leading feature columns (levels up to its depth) it reads."""
        depths = [level_depth(level) for level in self.levels]
        if depths != sorted(set(depths)):
            raise ValueError(f"levels must run from shallow to deep, got {list(self.levels)}")
        if not stages or any(stage not in self.levels for stage in stages):
            raise ValueError(f"stages {list(stages)} must be levels of {list(self.levels)}")
        if [level_depth(s) for s in stages] != sorted({level_depth(s) for s in stages}):
            raise ValueError(f"stages must run from shallow to deep, got {list(stages)}")
        widths = [self._level_channels(level) for level in self.levels]
        ends = [sum(widths[: self.levels.index(stage) + 1]) for stage in stages]
        return tuple(ends)

    def stage_embeddings(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's raw embedding, from the features of the levels it sees."""
        return [head(features[:, :end])
                for head, end in zip(self.stage_heads, self.stage_ends, strict=True)]

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stages = self.stage_embeddings(features)
        scale = len(stages) ** -0.5
        return features, torch.cat([F.normalize(x, dim=1) * scale for x in stages], dim=1)


def _stage_dims(stage_dims: Sequence[int] | None, embed_dim: int | None, count: int) -> list:
    if stage_dims is None:
        return split_evenly(embed_dim or 128 * count, count)
    dims = [int(d) for d in stage_dims]
    if len(dims) != count or min(dims) < 1:
        raise ValueError(f"stage_dims {dims} must give {count} positive sizes, one per stage")
    if embed_dim is not None and sum(dims) != embed_dim:
        raise ValueError(f"stage_dims {dims} sum to {sum(dims)}, not embed_dim {embed_dim}")
    return dims


def _stage_head(inputs: int, adapter_dim: int | None, dim: int) -> nn.Module:
    if not adapter_dim:
        return nn.Linear(inputs, dim)
    return nn.Sequential(nn.Linear(inputs, adapter_dim), nn.BatchNorm1d(adapter_dim), nn.ReLU(),
                         nn.Linear(adapter_dim, dim))


register_model(HDCNet.architecture)(
    lambda pretrained=True, **kw: HDCNet(pretrained=pretrained, **kw)
)

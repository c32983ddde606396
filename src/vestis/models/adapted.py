"""A shop-adapted model: any base model followed by a learned linear map of its vectors.

``vestis adapt`` learns the map from a shop's own catalog (photos that share an ``item_id``
are views of one product; :mod:`vestis.train.adapt`): a re-weighting of the blocks of a
joined base's vector, or a within-item whitening shrunk toward the identity, so the adapted
space keeps what the base model knows and only re-weights it for the shop. The base is
named, never copied: a checkpoint stores the map alone and rebuilds the base with
``create_model(base)``. The map is a square matrix of the base's width (``"matrix"``), a
scale per dimension (``"diagonal"``: a re-weighting, a few kB instead of megabytes) or
nothing (``"identity"``: the base unchanged).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.hooks import ModelHooks
from vestis.models.registry import create_model, register_model

MAPS = ("matrix", "diagonal", "identity")


class AdaptedNet(ModelHooks):
    """``W · normalise(base(x))``; ``W`` (a matrix, a diagonal or none, see :data:`MAPS`)
    starts as the identity."""

    architecture = "adapted"

    def __init__(self, base: str, map: str = "matrix"):
        super().__init__()
        if map not in MAPS:
            raise ValueError(f"unknown map {map!r}; expected one of {', '.join(MAPS)}")
        base = _portable_name(base)
        # Named "backbone" so that checkpoints leave the base's weights out (they load from
        # the base model's own file) and the trainer treats it as frozen.
        self.backbone = create_model(base)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.preprocess = self.backbone.preprocess
        self.embed_dim = self._base_dim()
        self.map = map
        if map == "matrix":
            self.transform = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
            with torch.no_grad():
                self.transform.weight.copy_(torch.eye(self.embed_dim))
        elif map == "diagonal":
            self.scale = nn.Parameter(torch.ones(self.embed_dim))
        self.onnx_exportable = self.backbone.onnx_exportable
        self.config = {"base": base, "map": map}

    @classmethod
    def with_map(cls, base: str, weight: torch.Tensor | None) -> AdaptedNet:
        """``base`` followed by ``weight``: a square matrix, a vector (the diagonal of one)
        or ``None`` (the identity)."""
        kind = "identity" if weight is None else "diagonal" if weight.dim() == 1 else "matrix"
        model = cls(base, map=kind)
        with torch.no_grad():
            if kind == "matrix":
                model.transform.weight.copy_(weight)
            elif kind == "diagonal":
                model.scale.copy_(weight)
        return model

    def _base_dim(self) -> int:
        size = self.preprocess.size
        with torch.inference_mode():
            return int(self.backbone.eval()(torch.zeros(1, 3, size, size)).shape[-1])

    def base_vectors(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x).float(), dim=-1)

    def map_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """The learned map applied to normalised base vectors (training runs on these)."""
        weight = (self.transform.weight if self.map == "matrix"
                  else self.scale if self.map == "diagonal" else None)
        return apply_map(vectors, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map_vectors(self.base_vectors(x))

    def train(self, mode: bool = True) -> AdaptedNet:
        super().train(mode)
        self.backbone.eval()  # the base never trains (its batch norms keep their statistics)
        return self


def apply_map(vectors: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``vectors`` through a map: a square matrix, a vector (the diagonal of one) or
    ``None`` (the identity)."""
    if weight is None:
        return vectors
    return vectors * weight if weight.dim() == 1 else vectors @ weight.T


def _portable_name(base: str) -> str:
    """Registered names stay names; a checkpoint path is stored absolute."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.suffix == ".pt" and path.exists() else base


@register_model("adapted")
def adapted(pretrained: bool = True, base: str = "vestis-lite0", map: str = "matrix"
            ) -> AdaptedNet:
    return AdaptedNet(base, map=map)

"""A shop-adapted model: any base model followed by a learned linear map of its vectors.

``vestis adapt`` learns the map from a shop's own catalog (photos that share an ``item_id``
are views of one product; :mod:`vestis.train.adapt`): a re-weighting of the blocks of a
joined base's vector, or a within-item whitening shrunk toward the identity, so the adapted
space keeps what the base model knows and only re-weights it for the shop. The base is
named, never copied: a checkpoint stores the map alone (a square matrix of the base's
width) and rebuilds the base with ``create_model(base)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.hooks import ModelHooks
from vestis.models.registry import create_model, register_model


class AdaptedNet(ModelHooks):
    """``W · normalise(base(x))``; ``W`` starts as the identity."""

    architecture = "adapted"

    def __init__(self, base: str):
        super().__init__()
        base = _portable_name(base)
        # Named "backbone" so that checkpoints leave the base's weights out (they load from
        # the base model's own file) and the trainer treats it as frozen.
        self.backbone = create_model(base)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.preprocess = self.backbone.preprocess
        self.embed_dim = self._base_dim()
        self.transform = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(self.embed_dim))
        self.onnx_exportable = self.backbone.onnx_exportable
        self.config = {"base": base}

    def _base_dim(self) -> int:
        size = self.preprocess.size
        with torch.inference_mode():
            return int(self.backbone.eval()(torch.zeros(1, 3, size, size)).shape[-1])

    def base_vectors(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x).float(), dim=-1)

    def map_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """The learned map applied to normalised base vectors (training runs on these)."""
        return self.transform(vectors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map_vectors(self.base_vectors(x))

    def train(self, mode: bool = True) -> AdaptedNet:
        super().train(mode)
        self.backbone.eval()  # the base never trains (its batch norms keep their statistics)
        return self


def _portable_name(base: str) -> str:
    """Registered names stay names; a checkpoint path is stored absolute."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.suffix == ".pt" and path.exists() else base


@register_model("adapted")
def adapted(pretrained: bool = True, base: str = "vestis-lite0") -> AdaptedNet:
    return AdaptedNet(base)

"""The basic embedding network: backbone, global pooling and an optional projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vestis.images import Preprocess
from vestis.models.efficientnet_lite import VARIANTS, efficientnet_lite
from vestis.models.pooling import create_pooling
from vestis.models.registry import register_model


class RetrievalNet(nn.Module):
    """Backbone → pooling → (linear projection) → embedding.

    ``forward`` returns raw embeddings; :class:`vestis.models.Encoder` L2-normalises them.
    ``config`` holds the keyword arguments that rebuild the same architecture.
    """

    architecture = "retrieval_net"

    def __init__(
        self,
        backbone: str = "lite0",
        pooling: str = "avg",
        embed_dim: int | None = None,
        gem_p: float = 3.0,
        pretrained: bool = True,
    ):
        super().__init__()
        self.config = {
            "backbone": backbone,
            "pooling": pooling,
            "embed_dim": embed_dim,
            "gem_p": gem_p,
        }
        self.backbone = efficientnet_lite(backbone, pretrained=pretrained)
        self.pool = create_pooling(pooling, **({"p": gem_p} if pooling == "gem" else {}))
        features = self.backbone.num_features
        self.projection = nn.Linear(features, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or features
        self.preprocess = Preprocess(size=VARIANTS[backbone].resolution)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pooled_features(x)
        return self.projection(features) if self.projection is not None else features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self(x), dim=-1)


def _retrieval_net_factory(backbone: str):
    def factory(pretrained: bool = True, **kwargs) -> RetrievalNet:
        kwargs.setdefault("backbone", backbone)
        return RetrievalNet(pretrained=pretrained, **kwargs)

    factory.__doc__ = f"EfficientNet-{backbone.capitalize()} ImageNet features, pooled."
    return factory


for _variant in VARIANTS:
    register_model(_variant)(_retrieval_net_factory(_variant))
register_model(RetrievalNet.architecture)(
    lambda pretrained=True, **kw: RetrievalNet(pretrained=pretrained, **kw)
)

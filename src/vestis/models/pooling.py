"""Global pooling of a feature map into one vector."""

from __future__ import annotations

import torch
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling; ``p=1`` is average pooling, large ``p`` tends to max."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False):
        super().__init__()
        value = torch.tensor(float(p))
        self.p = nn.Parameter(value) if learnable else nn.Buffer(value)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


def create_pooling(name: str, **kwargs) -> nn.Module:
    poolings = {"avg": AvgPool, "max": MaxPool, "gem": GeM}
    if name not in poolings:
        raise ValueError(f"unknown pooling {name!r}; one of {sorted(poolings)}")
    return poolings[name](**kwargs)

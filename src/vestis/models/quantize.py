"""int8 weight storage for shipped checkpoints (the project's weights must stay small).

Weight matrices and conv kernels are stored as symmetric int8 with one fp16 scale per output
channel (the first axis); other floating tensors (biases, BatchNorm) as fp16. Loading
dequantizes them back to float32: only the file is smaller, not the computation.
"""

from __future__ import annotations

import torch


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8 with one fp16 scale per output channel (a conv's first axis)."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(weight.shape), "scale": scale.half()}


def dequantize(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    q = packed["q"]
    return (q.float().reshape(q.shape[0], -1) * packed["scale"].float()[:, None]).reshape(q.shape)


def pack(value: torch.Tensor):
    """A tensor as shipped: matrices and kernels int8 per channel, other floats fp16."""
    value = value.detach().cpu()
    if value.is_floating_point() and value.ndim >= 2:
        return quantize(value)
    return (value.half() if value.is_floating_point() else value).clone()


def unpack(value) -> torch.Tensor:
    return dequantize(value) if isinstance(value, dict) else value

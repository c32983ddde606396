"""ABE-M, the attention-based ensemble, and its M-heads baseline.

Kim, Goyal, Chawla, Lee, Kwon, "Attention-based Ensemble for Deep Metric Learning",
ECCV 2018.

Both ensembles split the network into a shared feature extractor S, which every learner
reads, and a global embedding function G (the deep layers, global pooling and an embedding
layer), and concatenate M learners' embeddings:

- **ABE-M** (:class:`ABENet`) keeps *one* G for all learners. Learner m sees the shared map
  through its own attention mask, ``e_m = G(A_m(S(x)) ⊙ S(x))``: M attention modules
  read S(x) and each outputs a soft mask of the map's own shape (sigmoid, so gradients reach
  it in full). The modules share a trunk and differ in their last 1×1 convolution, as in the
  paper (where the trunk is a copy of inception 4a-4e and the masks multiply inception 3b's
  output). Without the divergence loss (:mod:`vestis.losses.abe`) the masks, and with them
  the learners, collapse onto one another.
- **M-heads** (:class:`MHeadsNet`) has no attention: each learner has its own copy of G
  on the unmodified map, ``e_m = G_m(S(x))``, so it costs M times G's parameters.

Here S is the frozen EfficientNet-Lite backbone up to stage ``attend_at_stage - 1``, whose
output the trainer caches (``finetune_from_stage`` must equal ``attend_at_stage``), and G is
the rest of it (stages ``attend_at_stage`` and up and the 1280-channel head convolution),
then pooling and a linear embedding of ``embed_dim / M`` units. The default cut, 7, puts the
attention on the last stage's 320×7×7 map and leaves G the head convolution. It is chosen
for the CPU budget and the 10 MB checkpoint: every step runs G M times (forward and
backward), and M-heads ships M copies of G, 1.6 MB each at cut 7 but 3.9 MB at cut 6
(stage 6 too), which would not fit four learners. The attention trunk is therefore a small
inception block (1×1, 3×3 and pooling branches) rather than a copy of G. Its masks start
around 0.9, so that G first sees nearly its usual input (the learners then start almost
alike, and the divergence loss parts them). G's convolution, and each of M-heads' copies,
is fine-tuned at the backbone's rate (``backbone_lr_scale``), the rest at the base rate.

G's head convolution normalises with its ImageNet batch-norm statistics in training as in
evaluation (its scale and shift train). With batch statistics, learners that share a batch
share them, and the divergence loss can then part the learners by centring them on their
mean, a difference that vanishes at evaluation (where running statistics are used).

The retrieval vector concatenates the L2-normalised learners, each scaled by ``1/√M``: a
unit vector whose dot products are the mean of the learners' cosine similarities.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.registry import register_model
from vestis.models.retrieval_net import HEAD_LEVEL, RetrievalNet

DEFAULT_CUT = 7
# Convolutions on CPU run faster (caching above all) in NHWC layout.
CHANNELS_LAST = torch.channels_last


class AttentionModules(nn.Module):
    """M attention modules over a (C, H, W) map: a shared inception trunk, then one 1×1
    convolution + sigmoid per learner giving a mask of the map's shape."""

    def __init__(self, channels: int, learners: int, width: int = 96,
                 initial_mask: float = 0.9):
        super().__init__()
        branch = width // 3
        self.one = _conv_bn(channels, branch, 1)
        self.three = nn.Sequential(_conv_bn(channels, branch, 1), _conv_bn(branch, branch, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                  _conv_bn(channels, width - 2 * branch, 1))
        self.masks = nn.ModuleList(nn.Conv2d(width, channels, 1) for _ in range(learners))
        with torch.no_grad():  # masks start around `initial_mask`: G first sees its usual input
            for mask in self.masks:
                mask.bias.fill_(torch.logit(torch.tensor(initial_mask)).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C, H, W) masks in (0, 1)."""
        trunk = torch.cat([self.one(x), self.three(x), self.pool(x)], dim=1)
        return torch.stack([mask(trunk).sigmoid() for mask in self.masks])


def _conv_bn(inputs: int, outputs: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


class UpperStages(nn.Module):
    """A trainable copy of the backbone's stages ``cut`` and up plus its head convolution."""

    def __init__(self, backbone: nn.Module, cut: int):
        super().__init__()
        modules = backbone.stage_modules(cut)
        self.blocks = nn.Sequential(*copy.deepcopy(modules[:-2]))
        self.conv, self.bn = copy.deepcopy(modules[-2]), copy.deepcopy(modules[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_conv(self.conv, self.bn, self.blocks(x))


def head_conv(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``relu6(bn(conv(x)))`` with ``bn``'s running statistics in training too (its scale
    and shift still train): see the module docstring."""
    x = F.batch_norm(conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                     training=False, eps=bn.eps)
    return F.relu6(x)


class LearnerEnsembleNet(RetrievalNet):
    """What ABE-M and M-heads share: the cut, the learners and the concatenated embedding.

    ``extract_upper`` returns the M learners' pooled G outputs side by side (B, M × 1280),
    ``head`` embeds each with its embedding layer and concatenates the normalised results.
    """

    architecture = ""

    def __init__(
        self,
        learners: int = 4,
        attend_at_stage: int = DEFAULT_CUT,
        embed_dim: int = 256,
        levels=(HEAD_LEVEL,),
        adapter_dim: int | None = None,
        category_classes: int = 0,
        pretrained: bool = True,
        **kwargs,
    ):
        _check_ensemble(learners, embed_dim, levels, adapter_dim, category_classes)
        super().__init__(levels=(HEAD_LEVEL,), embed_dim=None, adapter_dim=None,
                         pretrained=pretrained, **kwargs)
        if not 1 <= attend_at_stage <= len(self.backbone.stage_channels):
            raise ValueError(f"attend_at_stage must be a stage index 1-7, got {attend_at_stage}")
        self.learners, self.attend_at_stage = int(learners), int(attend_at_stage)
        self.head_from_stage = self.attend_at_stage  # the trainer checks finetune_from_stage
        self.learner_dim = embed_dim // learners
        self.feature_dim = self.adapter_output_dim = learners * self.backbone.num_features
        self.embed_dim = self.output_dim = embed_dim
        self.config.update(learners=self.learners, attend_at_stage=self.attend_at_stage,
                           embed_dim=embed_dim)

    def _finish(self) -> None:
        """Called by subclasses once their layers exist."""
        self.to(memory_format=CHANNELS_LAST)

    # -- the cut -------------------------------------------------------------------------
    def check_cut(self, cut: int | None) -> int:
        if cut != self.attend_at_stage:
            raise ValueError(
                f"{self.architecture} attends at stage {self.attend_at_stage}: the recipe needs "
                f"model.freeze_backbone: true and model.finetune_from_stage: "
                f"{self.attend_at_stage} (got {cut})")
        return cut

    def extract_lower(self, x: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous(memory_format=CHANNELS_LAST)
        return super().extract_lower(x, self.check_cut(cut))

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract_upper(*self.extract_lower(x, self.attend_at_stage),
                                  self.attend_at_stage)

    def extract_upper(self, entry: torch.Tensor, lower: torch.Tensor, cut: int) -> torch.Tensor:
        """The learners' pooled G outputs, (B, M × 1280), learner by learner."""
        self.check_cut(cut)
        pooled = self.learner_features(entry.contiguous(memory_format=CHANNELS_LAST))
        return pooled.transpose(0, 1).flatten(1)

    def learner_features(self, entry: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def global_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's G: stages from the cut, head convolution, pooling."""
        if self.attend_at_stage < len(self.backbone.stage_ends):
            x = self.backbone.run_stages(x, self.attend_at_stage)[-1]
        conv, bn = self.backbone.stage_modules(len(self.backbone.stage_ends))
        return self.pool(head_conv(conv, bn, x))

    # -- the embedding -------------------------------------------------------------------
    def learner_embeddings(self, features: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.learners ** -0.5
        learners = [F.normalize(e, dim=1) * scale for e in self.learner_embeddings(features)]
        return features, torch.cat(learners, dim=1)


class ABENet(LearnerEnsembleNet):
    """ABE-M: M attention masks over the shared map, one shared G and embedding layer."""

    architecture = "abe_net"

    def __init__(self, learners: int = 4, attention_width: int = 96, pretrained: bool = True,
                 **kwargs):
        super().__init__(learners=learners, pretrained=pretrained, **kwargs)
        channels = self._entry_channels()
        self.attention = AttentionModules(channels, self.learners, attention_width)
        self.projection = nn.Linear(self.backbone.num_features, self.learner_dim)
        self.config["attention_width"] = attention_width
        self._finish()

    def _entry_channels(self) -> int:
        return self.backbone.stage_channels[self.attend_at_stage - 1]

    def attention_masks(self, entry: torch.Tensor) -> torch.Tensor:
        """(M, B, C, H, W): each learner's mask over the map entering stage ``attend_at_stage``."""
        return self.attention(entry)

    def learner_features(self, entry: torch.Tensor) -> torch.Tensor:
        masks = self.attention_masks(entry)
        attended = (masks * entry.unsqueeze(0)).flatten(0, 1)  # (M·B, C, H, W), one G pass
        attended = attended.contiguous(memory_format=CHANNELS_LAST)
        return self.global_embedding(attended).unflatten(0, (self.learners, len(entry)))

    def learner_embeddings(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [self.projection(x) for x in features.chunk(self.learners, dim=1)]

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M, H, W) in [0, 1]: each learner's mask averaged over channels, for display."""
        entry, _ = self.extract_lower(x, self.attend_at_stage)
        return self.attention_masks(entry).mean(dim=2).transpose(0, 1)


class MHeadsNet(LearnerEnsembleNet):
    """M-heads: no attention; M copies of G (the first is the backbone's own), M embedding
    layers."""

    architecture = "m_heads_net"

    def __init__(self, learners: int = 4, pretrained: bool = True, **kwargs):
        super().__init__(learners=learners, pretrained=pretrained, **kwargs)
        self.extra_heads = nn.ModuleList(UpperStages(self.backbone, self.attend_at_stage)
                                         for _ in range(self.learners - 1))
        self.projections = nn.ModuleList(
            nn.Linear(self.backbone.num_features, self.learner_dim) for _ in range(self.learners))
        self._finish()

    def finetuned_backbone_modules(self, cut: int) -> list[nn.Module]:
        """For the trainer: every head's G, the backbone's and the copies, is fine-tuned at
        the backbone's rate, as ABE-M's single G is."""
        return [*self.backbone.stage_modules(self.check_cut(cut)), *self.extra_heads]

    def learner_features(self, entry: torch.Tensor) -> torch.Tensor:
        heads = [self.global_embedding(entry)]
        heads += [self.pool(head(entry)) for head in self.extra_heads]
        return torch.stack(heads)

    def learner_embeddings(self, features: torch.Tensor) -> list[torch.Tensor]:
        chunks = features.chunk(self.learners, dim=1)
        return [projection(x) for projection, x in zip(self.projections, chunks, strict=True)]


def _check_ensemble(learners, embed_dim, levels, adapter_dim, category_classes) -> None:
    if learners < 2:
        raise ValueError(f"an ensemble needs at least 2 learners, got {learners}")
    if not embed_dim or embed_dim % learners:
        raise ValueError(f"embed_dim {embed_dim} must split evenly into {learners} learners")
    if list(levels) != [HEAD_LEVEL]:
        raise ValueError(f"the learners' G ends at the head convolution: levels must be "
                         f"['head'], got {list(levels)}")
    if adapter_dim or category_classes:
        raise ValueError("ABE-M and M-heads take no adapter_dim or category classifier")


for _net in (ABENet, MHeadsNet):
    register_model(_net.architecture)(
        lambda pretrained=True, _cls=_net, **kw: _cls(pretrained=pretrained, **kw))

"""The visual attention model with the Impdrop connection, for clothing retrieval.

Wang, Gu, Zhang, Zhou, Gu, "Clothing Retrieval with Visual Attention Model", 2017
(arXiv:1710.11446).

Two branches, concatenated into one feature vector:

- the **global branch**, the whole network's pooled features of the photo;
- the **attention branch**: a small fully convolutional network (FCN) predicts a spatial
  attention map, which is fused with **low-level** features of the backbone, and the fused
  map goes on through the higher layers. Fusing with a low-level feature map rather than the
  photo avoids the fake edges a masked photo would show the network.

The fusion is **Impdrop** (:func:`impdrop`): a dropout whose keep probabilities are the
attention map. At training time each position of the feature map is kept with probability
``a`` (a Bernoulli mask, shared by the channels) and the kept map is scaled by
positions / kept positions, as inverted dropout scales; the plain product ``F ⊙ a`` that the
paper compares it with over-fits on small training sets. The mask is sampled, so the
gradient reaches the attention map by the straight-through estimator (forward: the Bernoulli
mask; backward: as if the mask were ``a``). At evaluation time Impdrop is its expected value
(:func:`expected_impdrop`): the map weighted by ``a`` and scaled by positions / ``sum(a)``,
what training keeps on average, so the background suppression reaches the search vectors and
training and search see the same input on average.

Here (a CPU-sized reading of the paper, whose FCN was pre-trained on clothes parsing and
person segmentation; ours learns from the triplet loss, after an optional pre-training on the
person/garment masks of Clothing Co-Parsing, ``model.attention_pretrain`` in a recipe,
:mod:`vestis.train.attention_pretrain`):

- the low-level features are the map entering stage ``attend_at_stage`` (default 3:
  40×28×28 for Lite0 at 224 px, stride 8). The FCN reads that map, so the frozen stages
  below it are the FCN's shared lower layers; its own layers are three dilated 3×3
  convolutions (receptive field about 150 px) and a 1×1 convolution to one channel;
- the attention branch has higher layers of its own, so that it does not equal the global
  branch where the attention is flat. It trains a copy of the next
  ``branch_stages`` stages (default 2: stages 3 and 4, 2.5 MB), and shares the remaining
  frozen stages and the head convolution with the global branch;
- the global branch is the frozen backbone's pooled ``levels``. Both branches' frozen parts
  are computed once per view by :meth:`ImpdropNet.extract_lower` and cached by the trainer
  (``finetune_from_stage`` must equal ``attend_at_stage``). The trainer fine-tunes the
  branch's copy of stages (at ``backbone_lr_scale``), not the backbone's own stages, which
  the cached global branch needs unchanged; fine-tuning stages 3-6 would also make the
  checkpoint 12.6 MB larger;
- the attention branch's pooled head features (L2-normalised) are concatenated with the
  global levels and go through the usual adapter and embedding layer, trained with a
  triplet loss.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.registry import register_model
from vestis.models.retrieval_net import RetrievalNet

DEFAULT_LEVELS = (2, 3, 4, "head")
# Convolutions on CPU run about 1.4x faster (training steps and caching) in NHWC layout.
CHANNELS_LAST = torch.channels_last


def impdrop(features: torch.Tensor, attention: torch.Tensor, training: bool) -> torch.Tensor:
    """Impdrop fusion of ``features`` (B, C, H, W) with ``attention`` (B, 1, H, W) in [0, 1].

    Training: each position is kept with probability ``attention`` and the kept map is scaled
    by (positions / kept positions) per image; the gradient reaches ``attention`` as if the
    mask were ``attention`` itself (straight-through). Evaluation: its expected value,
    :func:`expected_impdrop`.
    """
    if not training:
        return expected_impdrop(features, attention)
    keep = torch.bernoulli(attention.detach())
    mask = keep + attention - attention.detach()
    kept = keep.flatten(1).sum(dim=1).clamp_min(1.0)
    scale = (keep[0].numel() / kept).view(-1, 1, 1, 1)
    return features * mask * scale


def expected_impdrop(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """What :func:`impdrop` keeps on average: ``features * a * positions / sum(a)`` per image.

    The training mask keeps a position with probability ``a`` and scales by positions / kept;
    its mean kept count is ``sum(a)``, so this is the expectation to first order (exact when
    the kept count is fixed). A flat attention gives ``features`` back; the mean weight of
    an image's positions is always 1.
    """
    total = attention.flatten(1).sum(dim=1).clamp_min(1e-6)
    scale = (attention[0].numel() / total).view(-1, 1, 1, 1)
    return features * attention * scale


class AttentionFCN(nn.Module):
    """A small fully convolutional network: a feature map → a (B, 1, H, W) attention map."""

    def __init__(self, channels: int, width: int = 32, initial_keep: float = 0.8):
        super().__init__()
        layers, inputs = [], channels
        for dilation in (1, 2, 4):
            layers += [nn.Conv2d(inputs, width, 3, padding=dilation, dilation=dilation,
                                 bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            inputs = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, 1, 1)
        with torch.no_grad():  # start by keeping most of the map, so early steps learn stably
            self.out.weight.mul_(0.1)
            self.out.bias.fill_(torch.logit(torch.tensor(initial_keep)).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)).sigmoid()


class ImpdropNet(RetrievalNet):
    """Global branch (frozen pooled ``levels``) + attention branch (FCN, Impdrop, a trained
    copy of ``branch_stages`` stages, the frozen rest), concatenated → adapter → embedding."""

    architecture = "impdrop_net"
    # extract_lower caches the global branch too, not just the levels below the cut
    cache_tag = "impdrop"

    def __init__(
        self,
        attend_at_stage: int = 3,
        branch_stages: int = 2,
        attention_width: int = 32,
        levels: Sequence[int | str] = DEFAULT_LEVELS,
        adapter_dim: int | None = 512,
        embed_dim: int | None = 256,
        category_classes: int = 0,
        category_weight: float = 0.0,
        pretrained: bool = True,
        **kwargs,
    ):
        super().__init__(levels=levels, embed_dim=None, adapter_dim=None, pretrained=pretrained,
                         **kwargs)
        stages = len(self.backbone.stage_channels)
        if not 1 <= attend_at_stage < stages:
            raise ValueError(f"attend_at_stage must be a stage index 1-{stages - 1}")
        if not 1 <= branch_stages <= stages - attend_at_stage:
            raise ValueError(f"branch_stages must be 1-{stages - attend_at_stage} from stage "
                             f"{attend_at_stage}, got {branch_stages}")
        self.attend_at_stage, self.branch_stages = attend_at_stage, branch_stages
        self.head_from_stage = attend_at_stage  # the trainer checks finetune_from_stage
        self.attention = AttentionFCN(self.backbone.stage_channels[attend_at_stage - 1],
                                      attention_width)
        self.branch = nn.Sequential(*copy.deepcopy(self._stage_blocks(attend_at_stage,
                                                                      branch_stages)))
        self.global_dim = self.feature_dim
        self.category_weight = float(category_weight)
        self._build_head(self.global_dim + self.backbone.num_features, adapter_dim, embed_dim,
                         category_classes)
        self.config.update(attend_at_stage=attend_at_stage, branch_stages=branch_stages,
                           attention_width=attention_width, adapter_dim=adapter_dim,
                           embed_dim=embed_dim, category_classes=category_classes,
                           category_weight=category_weight)
        self.to(memory_format=CHANNELS_LAST)

    def _stage_blocks(self, start: int, count: int) -> list[nn.Module]:
        ends = self.backbone.stage_ends
        return self.backbone.stage_modules(start)[:ends[start + count - 1] - ends[start - 1]]

    # -- the cut -------------------------------------------------------------------------
    def check_cut(self, cut: int | None) -> int:
        if cut != self.attend_at_stage:
            raise ValueError(
                f"impdrop_net attends at stage {self.attend_at_stage}: the recipe needs "
                f"model.freeze_backbone: true and model.finetune_from_stage: "
                f"{self.attend_at_stage} (got {cut})")
        return cut

    def finetuned_backbone_modules(self, cut: int) -> list[nn.Module]:
        """For the trainer: the attention branch's copy of stages (fine-tuned at the backbone's
        rate), not the backbone, which the global branch needs as the trainer cached it."""
        self.check_cut(cut)
        return [self.branch]

    # -- the branches --------------------------------------------------------------------
    def extract_lower(self, x: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part: (low-level map entering stage ``cut``, global branch features)."""
        stages = self.backbone.run_stages(x.contiguous(memory_format=CHANNELS_LAST), 0, None)
        return stages[self.check_cut(cut) - 1], self._pool_levels(stages, {})

    def extract_upper(self, entry: torch.Tensor, lower: torch.Tensor, cut: int) -> torch.Tensor:
        self.check_cut(cut)
        if lower.shape[1] != self.global_dim:
            raise ValueError(f"cached global features have {lower.shape[1]} dims, expected "
                             f"{self.global_dim}: a stale feature cache?")
        entry = entry.contiguous(memory_format=CHANNELS_LAST)
        attended = impdrop(entry, self.attention(entry), self.training)
        return torch.cat([lower, self.attention_branch(attended)], dim=1)

    def attention_branch(self, attended: torch.Tensor) -> torch.Tensor:
        """The higher layers on the fused map: the trained copy, then the frozen rest."""
        x = self.branch(attended)
        rest = self.attend_at_stage + self.branch_stages
        if rest < len(self.backbone.stage_ends):
            x = self.backbone.run_stages(x, rest)[-1]
        return F.normalize(self.pool(self.backbone.head(x)), dim=1)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract_upper(*self.extract_lower(x, self.attend_at_stage),
                                  self.attend_at_stage)

    def low_level_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map entering stage ``attend_at_stage``: what the attention reads and weights."""
        x = x.contiguous(memory_format=CHANNELS_LAST)
        return self.backbone.run_stages(x, 0, self.attend_at_stage)[-1]

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1]: the FCN's attention over the low-level map, for display."""
        return self.attention(self.low_level_map(x))


register_model(ImpdropNet.architecture)(
    lambda pretrained=True, **kw: ImpdropNet(pretrained=pretrained, **kw)
)

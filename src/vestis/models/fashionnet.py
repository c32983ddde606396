"""FashionNet (Liu et al., CVPR 2016): global features plus features pooled at landmarks.

FashionNet's "pose" branch predicts eight clothing landmarks (collar, sleeve ends,
waistline, hem: left and right) with their visibility, and its "local" branch pools the
feature map at the predicted landmarks, so a match can rest on what a sleeve end or a
collar looks like. Here:

- the **landmark branch** (:class:`LandmarkHead`) reads the backbone's stage ``local_stage``
  map and predicts, per landmark, a location (the soft-argmax of a heat map, (x, y) in
  ``[-1, 1]`` of the model's square input, ``grid_sample``'s ``align_corners=False``
  convention) and a visibility logit. It is trained on landmarks read off Clothing
  Co-Parsing garment masks, computed outside this module and given as targets
  (:mod:`vestis.train.landmark_targets`, :class:`vestis.losses.LandmarkLoss`);
- the **local branch** samples the same stage map bilinearly at each *predicted* landmark,
  weighted by its predicted visibility probability, and the eight local vectors join the
  pooled global levels of :class:`RetrievalNet`; the trainable head (adapter + projection)
  sees both.

The backbone is frozen; the landmark branch is trained before the retrieval head (its
predictions are part of the cached ``extract``), then frozen with it. This module needs no
garment parser: the model is one network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vestis.models.registry import register_model
from vestis.models.retrieval_net import HEAD_LEVEL, RetrievalNet

#: FashionNet's eight landmarks, in the order of :data:`vestis.detect.landmarks.LANDMARKS`.
NUM_LANDMARKS = 8


def cell_centres(size: int, device=None) -> torch.Tensor:
    """(size,) centres of ``size`` cells in ``[-1, 1]`` (``align_corners=False``)."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1


class LandmarkHead(nn.Module):
    """A stage map (B, C, h, w) -> landmark locations (B, K, 2) in ``[-1, 1]`` as (x, y), the
    soft-argmax of K heat maps, and visibility logits (B, K)."""

    def __init__(self, channels: int, count: int = NUM_LANDMARKS, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.heatmaps = nn.Conv2d(width, count, 1)
        self.visibility = nn.Linear(width, count)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        logits = self.heatmaps(hidden)
        batch, count, height, width = logits.shape
        weights = logits.flatten(2).softmax(dim=-1).view(batch, count, height, width)
        xs = (weights.sum(dim=2) * cell_centres(width, x.device)).sum(dim=-1)
        ys = (weights.sum(dim=3) * cell_centres(height, x.device)).sum(dim=-1)
        return torch.stack([xs, ys], dim=-1), self.visibility(hidden.mean(dim=(2, 3)))


class FashionNet(RetrievalNet):
    architecture = "fashionnet"
    cache_tag = "fashionnet-predicted-landmarks"
    onnx_exportable = False  # sampling at predicted points: ONNX export not checked

    def __init__(self, local_stage: int = 4, landmark_width: int = 64,
                 levels: Sequence[int | str] = (HEAD_LEVEL,), pretrained: bool = True,
                 **kwargs):
        super().__init__(levels=levels, pretrained=pretrained, **kwargs)
        if not 0 <= local_stage < len(self.backbone.stage_channels):
            raise ValueError(f"local_stage must be a stage index 0-"
                             f"{len(self.backbone.stage_channels) - 1}, got {local_stage}")
        self.config.update({"local_stage": local_stage, "landmark_width": landmark_width})
        self.local_stage = local_stage
        channels = self.backbone.stage_channels[local_stage]
        self.landmark_head = LandmarkHead(channels, NUM_LANDMARKS, landmark_width)
        self.global_dim = self.feature_dim
        self.local_dim = NUM_LANDMARKS * channels
        self._build_head(self.global_dim + self.local_dim, kwargs.get("adapter_dim"),
                         kwargs.get("embed_dim"), kwargs.get("category_classes", 0))

    def landmark_map(self, x: torch.Tensor) -> torch.Tensor:
        """The stage map the landmark branch reads and the local branch samples."""
        return self.backbone.run_stages(x, 0, self.local_stage + 1)[-1]

    def predict_landmarks(self, stage_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(locations (B, 8, 2) in [-1, 1], visibility logits (B, 8)) from a stage map."""
        return self.landmark_head(stage_map)

    def landmarks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted landmarks of each input (B, 8, 2) in [-1, 1] (x, y) and their visibility
        probabilities (B, 8)."""
        points, logits = self.predict_landmarks(self.landmark_map(x))
        return points, logits.sigmoid()

    def local_features(self, stage_map: torch.Tensor, points: torch.Tensor,
                       visible: torch.Tensor) -> torch.Tensor:
        """The stage map sampled at each landmark (B, 8 x C), times its visibility (0 where not
        visible), the whole L2-normalised."""
        sampled = F.grid_sample(stage_map, points[:, None], mode="bilinear",
                                padding_mode="border", align_corners=False)  # B, C, 1, 8
        local = sampled[:, :, 0].transpose(1, 2) * visible[..., None]  # B, 8, C
        return F.normalize(local.flatten(1), dim=1)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.backbone.stage_features(x)
        global_features = self._pool_levels(stages, {})
        points, logits = self.predict_landmarks(stages[self.local_stage])
        local = self.local_features(stages[self.local_stage], points, logits.sigmoid())
        return torch.cat([global_features, local], dim=1)

    def extract_lower(self, x, cut):
        raise ValueError("fashionnet trains its head on cached features: no finetune_from_stage")


register_model(FashionNet.architecture)(
    lambda pretrained=True, **kw: FashionNet(pretrained=pretrained, **kw)
)

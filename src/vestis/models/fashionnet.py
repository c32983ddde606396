"""FashionNet (Liu et al., CVPR 2016): global features plus features pooled at landmarks.

FashionNet's "pose" branch pools local features around eight clothing landmarks (collar,
sleeves, waistline, hem) and concatenates them with the global features, so a match can
rest on what a sleeve end or a collar looks like. Here the landmarks come from the garment
parser (:mod:`vestis.detect`): it parses the input, the largest upper- or lower-body garment
is the one described, and :func:`vestis.detect.landmarks.mask_landmarks` reads its eight
landmarks off the mask. The backbone map of stage ``local_stage`` is sampled bilinearly at
each visible landmark (an invisible one gives zeros), and the eight local vectors join the
pooled global levels of :class:`RetrievalNet`; the trainable head (adapter + projection)
sees both.

Both the backbone and the parser are frozen, so ``extract`` is cached once per view and only
the head trains. The parser's weights are the shipped ones and are not part of the model's
state (checkpoints stay head-sized).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vestis.detect.groups import GROUPS
from vestis.detect.landmarks import LANDMARKS, UPPER_BODY, mask_landmarks
from vestis.models.registry import register_model
from vestis.models.retrieval_net import HEAD_LEVEL, RetrievalNet

#: The garment groups whose landmarks are described, the first present by area.
DESCRIBED = (*UPPER_BODY, "lower")


class FashionNet(RetrievalNet):
    architecture = "fashionnet"
    cache_tag = "fashionnet"
    onnx_exportable = False  # landmarks are read off the parse in numpy

    def __init__(self, local_stage: int = 4, parser: str = "parser-lite0",
                 parser_side: int = 224, levels: Sequence[int | str] = (HEAD_LEVEL,),
                 pretrained: bool = True, **kwargs):
        """``parser_side``: the model's square input is resized to this side (a multiple of
        32) for the parser; the parser was trained at 384 on the long side, and 224 costs
        a third of that."""
        super().__init__(levels=levels, pretrained=pretrained, **kwargs)
        if not 0 <= local_stage < len(self.backbone.stage_channels):
            raise ValueError(f"local_stage must be a stage index 0-"
                             f"{len(self.backbone.stage_channels) - 1}, got {local_stage}")
        if parser_side % 32 or parser_side < 64:
            raise ValueError(f"parser_side must be a multiple of 32, at least 64: {parser_side}")
        self.config.update({"local_stage": local_stage, "parser": parser,
                            "parser_side": parser_side})
        self.parser_side = parser_side
        self.local_stage = local_stage
        self.global_dim = self.feature_dim
        self.local_dim = len(LANDMARKS) * self.backbone.stage_channels[local_stage]
        self._build_head(self.global_dim + self.local_dim, kwargs.get("adapter_dim"),
                         kwargs.get("embed_dim"), kwargs.get("category_classes", 0))
        self.parser_name = parser
        self._parser = None  # loaded on first use, outside the module's state

    @property
    def parser(self):
        if self._parser is None:
            from vestis.detect.model import load_parser_net
            from vestis.detect.parser import SHIPPED

            path = SHIPPED.get(self.parser_name, self.parser_name)
            net, _ = load_parser_net(path)
            self.__dict__["_parser"] = net.eval()  # not a submodule: not saved, not trained
        return self._parser

    def landmarks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Landmarks of the described garment in each input (B, 8, 2) in [-1, 1] (x, y) and
        their visibility (B, 8)."""
        with torch.no_grad():
            side = self.parser_side
            resized = x if x.shape[-1] == side and x.shape[-2] == side else F.interpolate(
                x, size=(side, side), mode="bilinear", align_corners=False)
            labels = self.parser(resized).argmax(1).cpu().numpy()
        points = np.zeros((len(x), len(LANDMARKS), 2), dtype=np.float32)
        visible = np.zeros((len(x), len(LANDMARKS)), dtype=np.float32)
        for row, label_map in enumerate(labels):
            group, mask = described_garment(label_map)
            if group is None:
                continue
            found = mask_landmarks(mask, group)
            height, width = label_map.shape
            points[row] = (found.points + 0.5) / np.array([width, height]) * 2 - 1
            visible[row] = found.visible
        return torch.from_numpy(points).to(x.device), torch.from_numpy(visible).to(x.device)

    def local_features(self, stage_map: torch.Tensor, points: torch.Tensor,
                       visible: torch.Tensor) -> torch.Tensor:
        """The stage map sampled at each landmark (B, 8 x C), zero where not visible, the
        whole L2-normalised."""
        sampled = F.grid_sample(stage_map, points[:, None], mode="bilinear",
                                padding_mode="border", align_corners=False)  # B, C, 1, 8
        local = sampled[:, :, 0].transpose(1, 2) * visible[..., None]  # B, 8, C
        return F.normalize(local.flatten(1), dim=1)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.backbone.stage_features(x)
        global_features = self._pool_levels(stages, {})
        points, visible = self.landmarks(x)
        local = self.local_features(stages[self.local_stage], points, visible)
        return torch.cat([global_features, local], dim=1)

    def extract_lower(self, x, cut):
        raise ValueError("fashionnet trains its head on cached features: no finetune_from_stage")


def described_garment(label_map: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """The largest upper- or lower-body garment group of a label map, and its mask."""
    best, best_area = None, 0
    for group in DESCRIBED:
        area = int((label_map == GROUPS.index(group)).sum())
        if area > best_area:
            best, best_area = group, area
    if best is None:
        return None, None
    return best, label_map == GROUPS.index(best)


register_model(FashionNet.architecture)(
    lambda pretrained=True, **kw: FashionNet(pretrained=pretrained, **kw)
)

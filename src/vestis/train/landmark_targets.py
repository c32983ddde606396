"""FashionNet's landmark branch: targets read off CCP garment masks, and its training stage.

The data has no landmark annotations, so the targets are the rule-of-thumb landmarks of
:func:`vestis.detect.landmarks.garment_landmarks` (the largest upper- or lower-body garment of
a CCP photo's mask), computed here, at data-preparation time, and given to the model's
:class:`vestis.models.fashionnet.LandmarkHead` as targets; the model itself never parses.

Invariants:

- target points are in the model's letterboxed square input, as ``[-1, 1]`` (x, y) with
  ``align_corners=False`` (pixel centre ``i`` of ``n`` at ``(i + 0.5) / n * 2 - 1``);
  invisible landmarks are (0, 0) with visibility 0;
- only the landmark head trains (:class:`vestis.losses.LandmarkLoss`); the backbone map it
  reads is computed once, without gradients.

A recipe asks for it with ``model: {landmark_pretrain: {masks: CSV, epochs: N}}`` (keys as
:func:`vestis.train.attention_pretrain.pretrain_spec`); the trainer runs it before it caches
the features pooled at the predicted landmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vestis.detect.landmarks import garment_landmarks
from vestis.detect.metrics import load_group_mask
from vestis.losses.landmark import LandmarkLoss
from vestis.train.attention_pretrain import pretrain_spec
from vestis.train.masked_photos import masked_photos

NAME = "landmark_pretrain"


@dataclass(frozen=True)
class LandmarkSet:
    """``maps`` (N, C, h, w): the stage map the landmark head reads; ``points`` (N, 8, 2) in
    [-1, 1]; ``visible`` (N, 8) in {0, 1}."""

    maps: torch.Tensor
    points: torch.Tensor
    visible: torch.Tensor


def letterboxed_points(points: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """Pixel (x, y) points of a ``width`` x ``height`` photo -> ``[-1, 1]`` coordinates in the
    square of :meth:`vestis.images.Preprocess.letterbox` (side ``size``)."""
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    x = left + (points[:, 0] + 0.5) * new_w / width
    y = top + (points[:, 1] + 0.5) * new_h / height
    return np.stack([x, y], axis=1) / size * 2 - 1


def photo_targets(mask_path: Path, lookup: np.ndarray, size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(points (8, 2) in [-1, 1] of the letterboxed input, visibility (8,)) of one CCP mask."""
    groups = load_group_mask(mask_path, lookup)
    found = garment_landmarks(groups)
    height, width = groups.shape
    points = letterboxed_points(found.points, width, height, size) * found.visible[:, None]
    return points.astype(np.float32), found.visible.astype(np.float32)


def landmark_set(model, csv_path: str | Path, max_images: int, seed: int = 0,
                 skip: int = 0) -> LandmarkSet:
    """Stage maps and landmark targets of ``max_images`` CCP photos with a mask (a seeded
    choice; ``skip`` leaves out the first ``skip`` of that order, for held-out photos)."""
    maps, points, visible = [], [], []
    for row, pixels, lookup in masked_photos(model, csv_path, max_images, seed, skip):
        with torch.no_grad():
            maps.append(model.landmark_map(pixels).cpu())
        target = photo_targets(row.mask, lookup, model.preprocess.size)
        points.append(torch.from_numpy(target[0]))
        visible.append(torch.from_numpy(target[1]))
    return LandmarkSet(torch.cat(maps), torch.stack(points), torch.stack(visible))


def landmark_error(model, data: LandmarkSet) -> float:
    """Mean distance (in [-1, 1] units) between predicted and target visible landmarks."""
    model.landmark_head.eval()
    with torch.no_grad():
        points, _ = model.predict_landmarks(data.maps.to(next(model.parameters()).device))
    distance = (points.cpu() - data.points).norm(dim=-1)
    return float(distance[data.visible > 0.5].mean())


def fit_landmarks(model, data: LandmarkSet, epochs: int, lr: float = 3e-3,
                  batch_size: int = 16, seed: int = 0) -> list[float]:
    """Train ``model.landmark_head`` alone with :class:`LandmarkLoss`; each epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    head = model.landmark_head
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    criterion = LandmarkLoss()
    device = next(model.parameters()).device
    losses = []
    for _ in range(epochs):
        total, batches = 0.0, 0
        for index in torch.randperm(len(data.maps), generator=generator).split(batch_size):
            head.train()
            prediction = model.predict_landmarks(data.maps[index].to(device))
            loss, _ = criterion(prediction, (data.points[index].to(device),
                                             data.visible[index].to(device)))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, batches = total + float(loss.detach()), batches + 1
        losses.append(total / max(1, batches))
    head.eval()
    return losses


def pretrain_landmarks(model, spec: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Run a recipe's ``landmark_pretrain`` on ``model``; the landmark error before and after
    and the last epoch's loss."""
    spec = pretrain_spec(spec, NAME)
    if spec is None:
        return {}
    data = landmark_set(model, spec["masks"], int(spec["max_images"]), seed=seed)
    before = landmark_error(model, data)
    losses = fit_landmarks(model, data, int(spec["epochs"]), float(spec["lr"]),
                           int(spec["batch_size"]), seed)
    return {"images": float(len(data.maps)), "error_before": before,
            "error_after": landmark_error(model, data), "loss": losses[-1]}

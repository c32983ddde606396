"""Pre-training Impdrop's attention on person/garment masks, before retrieval training.

The paper pre-trains its attention FCN on clothes parsing and person segmentation, so that the
attention starts out keeping the person and dropping the background. Here the FCN of an
:class:`vestis.models.impdrop.ImpdropNet` is trained with a per-cell binary cross-entropy
toward the person/garment mask of Clothing Co-Parsing photos: a CCP label counts as
foreground when its group (:data:`vestis.detect.groups.CCP_LABEL_GROUPS`) is not
``background``, i.e. the person with everything worn.

Invariants:

- the photo goes through the model's own letterbox; the mask is letterboxed the same way
  (nearest neighbour) and the padding is *unknown*, not background;
- the target of a cell of the attention grid is the fraction of foreground pixels among its
  known pixels, its weight the fraction of known pixels (padding and unknown labels weigh 0);
- only the attention FCN changes: the backbone stages below the attended map are run once,
  without gradients, and the rest of the model is untouched.

A recipe asks for it with ``model: {attention_pretrain: {masks: CSV, epochs: N}}`` (keys in
:data:`PRETRAIN_KEYS`); the trainer runs it once, before the first epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vestis.detect.groups import group_index
from vestis.detect.metrics import load_group_mask
from vestis.train.masked_photos import masked_photos

PRETRAIN_KEYS = frozenset({"masks", "epochs", "max_images", "lr", "batch_size"})
PRETRAIN_DEFAULTS: dict[str, Any] = {"epochs": 10, "max_images": 200, "lr": 3e-3,
                                     "batch_size": 16}
UNKNOWN = 255


def pretrain_spec(spec: dict | None, name: str = "attention_pretrain"
                  ) -> dict[str, Any] | None:
    """A recipe's ``model.<name>`` (a pre-training stage on CCP masks) with defaults filled
    in; None when absent.

    Refuses an unknown key or a missing ``masks`` before any work starts.
    """
    if not spec:
        return None
    unknown = set(spec) - PRETRAIN_KEYS
    if unknown:
        raise ValueError(f"unknown model.{name} key(s): {', '.join(sorted(unknown))}")
    if not spec.get("masks"):
        raise ValueError(f"model.{name} needs masks: a CCP annotations.csv")
    spec = {**PRETRAIN_DEFAULTS, **spec}
    if int(spec["epochs"]) < 1 or int(spec["max_images"]) < 1:
        raise ValueError(f"model.{name}: epochs and max_images must be at least 1")
    return spec


@dataclass(frozen=True)
class MaskedMaps:
    """Low-level maps and their foreground targets on the attention's grid.

    ``maps`` (N, C, h, w): the map entering the attended stage; ``targets`` (N, 1, h, w) in
    [0, 1]: the foreground fraction of each cell; ``weights`` (N, 1, h, w) in [0, 1]: the
    known fraction of each cell.
    """

    maps: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def foreground_mask(mask_path: Path, lookup: np.ndarray) -> np.ndarray:
    """A CCP label map as 1 (person or worn), 0 (background) or :data:`UNKNOWN`."""
    groups = load_group_mask(mask_path, lookup)
    foreground = (groups != group_index("background")).astype(np.uint8)
    foreground[groups == UNKNOWN] = UNKNOWN
    return foreground


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` placed as :meth:`vestis.images.Preprocess.letterbox` places its photo; the
    padding is :data:`UNKNOWN`."""
    height, width = mask.shape
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST))
    canvas = np.full((size, size), UNKNOWN, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def cell_targets(mask: np.ndarray, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, h, w) foreground fraction of the known pixels of each cell, and (1, h, w) known
    fraction, for a letterboxed 0/1/UNKNOWN ``mask``."""
    tensor = torch.as_tensor(mask)[None, None]
    known = (tensor != UNKNOWN).float()
    foreground = (tensor == 1).float()
    known_cells = F.adaptive_avg_pool2d(known, grid)
    foreground_cells = F.adaptive_avg_pool2d(foreground, grid)
    targets = foreground_cells / known_cells.clamp_min(1e-6)
    return targets[0].clamp(0.0, 1.0), known_cells[0]


def masked_maps(model, csv_path: str | Path, max_images: int, seed: int = 0,
                skip: int = 0) -> MaskedMaps:
    """The low-level maps and cell targets of ``max_images`` CCP photos with a mask (a seeded
    choice; ``skip`` leaves out the first ``skip`` of that order, for held-out photos)."""
    maps, targets, weights = [], [], []
    for row, pixels, lookup in masked_photos(model, csv_path, max_images, seed, skip):
        with torch.no_grad():
            entry = model.low_level_map(pixels)
        target, weight = cell_targets(
            letterbox_mask(foreground_mask(row.mask, lookup), model.preprocess.size),
            tuple(entry.shape[-2:]))
        maps.append(entry.cpu().contiguous())
        targets.append(target)
        weights.append(weight)
    return MaskedMaps(torch.cat(maps), torch.stack(targets), torch.stack(weights))


def mask_agreement(model, data: MaskedMaps) -> float:
    """Mean attention on the foreground minus mean attention on the background (weighted by
    the cells' foreground and background shares of known pixels); in [-1, 1]."""
    attention = _attention(model, data.maps, train=False)
    inside = data.targets * data.weights
    outside = (1.0 - data.targets) * data.weights
    mean_in = (attention * inside).sum() / inside.sum().clamp_min(1e-6)
    mean_out = (attention * outside).sum() / outside.sum().clamp_min(1e-6)
    return float(mean_in - mean_out)


def _attention(model, maps: torch.Tensor, train: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    model.attention.train(train)
    with torch.set_grad_enabled(train):
        return model.attention(maps.to(device)).cpu()


def fit_attention(model, data: MaskedMaps, epochs: int, lr: float = 3e-3,
                  batch_size: int = 16, seed: int = 0) -> list[float]:
    """Train ``model.attention`` alone with weighted BCE toward ``data.targets``; the mean loss
    of each epoch. Other parameters are not touched."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.attention.parameters(), lr=lr, weight_decay=1e-4)
    device = next(model.parameters()).device
    losses = []
    for _ in range(epochs):
        total, batches = 0.0, 0
        for index in torch.randperm(len(data.maps), generator=generator).split(batch_size):
            attention = model.attention.train()(data.maps[index].to(device))
            loss = F.binary_cross_entropy(attention.clamp(1e-6, 1 - 1e-6),
                                          data.targets[index].to(device),
                                          weight=data.weights[index].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, batches = total + float(loss.detach()), batches + 1
        losses.append(total / max(1, batches))
    model.attention.eval()
    return losses


def pretrain_attention(model, spec: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Run a recipe's ``attention_pretrain`` (:func:`pretrain_spec`) on ``model``; returns the
    mask agreement before and after, and the last epoch's loss."""
    spec = pretrain_spec(spec)
    if spec is None:
        return {}
    data = masked_maps(model, spec["masks"], int(spec["max_images"]), seed=seed)
    before = mask_agreement(model, data)
    losses = fit_attention(model, data, int(spec["epochs"]), float(spec["lr"]),
                           int(spec["batch_size"]), seed)
    return {"images": float(len(data.maps)), "agreement_before": before,
            "agreement_after": mask_agreement(model, data), "bce": losses[-1]}

"""From a group label map to garment instances: one box per connected region of a group.

Steps, per garment group:

1. connected components of the group's pixels (8-connectivity);
2. components under ``min_pixels`` pixels are noise and dropped before merging;
3. fragments are merged: two clusters join when their boxes overlap or lie closer than
   ``merge_gap`` times the smaller cluster's box size (a top cut in two by an arm or a bag
   strap is one top; two shoes a step apart stay two);
4. clusters under ``min_area`` of the image, or under ``min_relative`` of the group's largest
   cluster, are dropped;
5. with probabilities given, garments whose score is under ``min_score`` are dropped: such
   low-confidence fragments (a scarf's edge read as a top) were most of the extra
   "garments" of a single-product photo.

The score of a garment is the mean probability of its group over the garment's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .groups import GARMENT_GROUPS, GROUPS

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class BoxRules:
    min_pixels: int = 12
    min_area: float = 0.001  # fraction of the image
    min_relative: float = 0.05  # fraction of the group's largest cluster
    merge_gap: float = 0.1  # fraction of the smaller cluster's larger box side
    min_score: float = 0.5  # mean probability of the group over the garment's pixels


@dataclass(frozen=True, eq=False)
class Region:
    """One garment instance: its group, box (x1, y1, x2, y2; x2, y2 exclusive), score and
    boolean mask (same size as the label map)."""

    group: str
    box: Box
    score: float
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _box_of(mask: np.ndarray) -> Box:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _gap(a: Box, b: Box) -> int:
    """Chebyshev distance between two boxes (0 when they touch or overlap)."""
    dx = max(a[0] - b[2], b[0] - a[2], 0)
    dy = max(a[1] - b[3], b[1] - a[3], 0)
    return max(dx, dy)


def _union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _merge(boxes: list[Box], areas: list[int], gap: float) -> list[list[int]]:
    """Greedy agglomeration of component indices whose boxes are close; repeats until stable."""
    clusters = [[i] for i in range(len(boxes))]
    cboxes = list(boxes)
    careas = list(areas)
    changed = True
    while changed:
        changed = False
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                small = cboxes[i] if careas[i] <= careas[j] else cboxes[j]
                size = max(small[2] - small[0], small[3] - small[1])
                if _gap(cboxes[i], cboxes[j]) <= gap * size:
                    clusters[i] += clusters.pop(j)
                    cboxes[i] = _union(cboxes[i], cboxes.pop(j))
                    careas[i] += careas.pop(j)
                    changed = True
                    break
            if changed:
                break
    return clusters


def regions_from_labels(
    labels: np.ndarray,
    probs: np.ndarray | None = None,
    *,
    groups: tuple[str, ...] = GROUPS,
    garment_groups: tuple[str, ...] = GARMENT_GROUPS,
    rules: BoxRules = BoxRules(),
) -> list[Region]:
    """Garment instances of a label map ``labels`` (H x W group indices into ``groups``).

    ``probs`` (G x H x W, per-group probabilities) gives the scores; without it every score
    is 1. Regions come sorted by group order, then top to bottom, left to right.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D label map, got shape {labels.shape}")
    height, width = labels.shape
    min_area = max(rules.min_pixels, rules.min_area * height * width)
    structure = np.ones((3, 3), dtype=bool)
    regions: list[Region] = []
    for name in garment_groups:
        index = groups.index(name)
        components, count = ndimage.label(labels == index, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
        slices = ndimage.find_objects(components)
        keep = [i for i in range(count) if areas[i] >= rules.min_pixels]
        if not keep:
            continue
        boxes = [(slices[i][1].start, slices[i][0].start, slices[i][1].stop, slices[i][0].stop)
                 for i in keep]
        clusters = _merge(boxes, [int(areas[i]) for i in keep], rules.merge_gap)
        cluster_areas = [sum(int(areas[keep[k]]) for k in cluster) for cluster in clusters]
        largest = max(cluster_areas)
        for cluster, area in zip(clusters, cluster_areas, strict=True):
            if area < min_area or area < rules.min_relative * largest:
                continue
            ids = np.array([keep[k] + 1 for k in cluster])
            mask = np.isin(components, ids)
            score = float(probs[index][mask].mean()) if probs is not None else 1.0
            if score < rules.min_score:
                continue
            regions.append(Region(name, _box_of(mask), score, mask))
    order = {name: i for i, name in enumerate(garment_groups)}
    regions.sort(key=lambda r: (order[r.group], r.box[1], r.box[0]))
    return regions

"""From a group label map to garment instances: one instance per garment worn, not one per
connected fragment.

Steps, per garment group:

1. connected components of the group's pixels (8-connectivity); components under
   ``min_pixels`` pixels are noise and dropped;
2. with ``per_person``, the components of a group that lie on one person (one connected
   region of non-background pixels) form one garment: an open jacket's two halves around a
   top, a top cut in two by an arm or a bag strap, a skirt split by a hand. Footwear is the
   exception: its components stay apart here (two shoes are two);
3. clusters then merge when their boxes overlap or lie closer than ``merge_gap`` times the
   smaller cluster's box size (the two pieces of one shoe; fragments on either side of a
   thin gap in the foreground);
4. clusters under ``min_area`` of the image, or under ``min_relative`` of the group's largest
   cluster, are dropped; so is a ``border_strip``: a cluster under ``strip_area`` of the
   image that touches the photo's edge and reaches less than ``strip_depth`` of the photo
   in from it (the trousers at the bottom of a hoodie's product photo);
5. footwear keeps at most ``max_footwear`` instances, the largest, and a second one only when
   it is at least ``footwear_relative`` of the first (two substantial shoes);
6. with probabilities given, garments whose score is under ``min_score`` are dropped: such
   low-confidence fragments (a scarf's edge read as a top) were most of the extra
   "garments" of a single-product photo.

Invariants: instances of one group never share a pixel; every instance's mask is a subset of
its group's pixels in ``labels`` (regrouping never changes the per-pixel labels, so mIoU is
unaffected); the score of a garment is the mean probability of its group over its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vestis.images import Box  # re-exported: vestis.detect.boxes.Box is the same type

from .groups import GARMENT_GROUPS, GROUPS

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class BoxRules:
    min_pixels: int = 12
    min_area: float = 0.001  # fraction of the image
    min_relative: float = 0.05  # fraction of the group's largest cluster
    merge_gap: float = 0.1  # fraction of the smaller cluster's larger box side
    min_score: float = 0.5  # mean probability of the group over the garment's pixels
    per_person: bool = True  # one garment per group per connected foreground region
    strip_area: float = 0.03  # a border strip is under this fraction of the image ...
    strip_depth: float = 0.1  # ... and reaches less than this fraction in from the edge
    max_footwear: int = 2
    footwear_relative: float = 0.3  # a second shoe is at least this fraction of the first


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


def _merge(boxes: list[Box], areas: list[int], gap: float,
           clusters: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy agglomeration of component indices whose boxes are close; repeats until stable.
    ``clusters``: the starting partition (default: one cluster per component)."""
    clusters = [list(c) for c in clusters] if clusters else [[i] for i in range(len(boxes))]
    cboxes = [_cluster_box(boxes, c) for c in clusters]
    careas = [sum(areas[i] for i in c) for c in clusters]
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


def _cluster_box(boxes: list[Box], cluster: list[int]) -> Box:
    box = boxes[cluster[0]]
    for i in cluster[1:]:
        box = _union(box, boxes[i])
    return box


def _by_person(people: list[int]) -> list[list[int]]:
    """Component indices grouped by the foreground region (person) they lie on."""
    found: dict[int, list[int]] = {}
    for i, person in enumerate(people):
        found.setdefault(person, []).append(i)
    return list(found.values())


def _is_border_strip(box: Box, area: int, shape: tuple[int, int], rules: BoxRules) -> bool:
    """A small cluster hugging the photo's edge: under ``strip_area`` of the image, touching
    an edge and reaching less than ``strip_depth`` of the photo in from it."""
    height, width = shape
    if area >= rules.strip_area * height * width:
        return False
    x1, y1, x2, y2 = box
    depth_x, depth_y = rules.strip_depth * width, rules.strip_depth * height
    return ((x1 == 0 and x2 <= depth_x) or (x2 == width and x1 >= width - depth_x)
            or (y1 == 0 and y2 <= depth_y) or (y2 == height and y1 >= height - depth_y))


@dataclass
class _Cluster:
    ids: list[int]  # component labels (1-based)
    box: Box
    area: int


def _group_clusters(components: np.ndarray, count: int, persons: np.ndarray, footwear: bool,
                    rules: BoxRules) -> list[_Cluster]:
    """The merged clusters of one group's components (steps 1 to 3), largest first."""
    areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(components)
    keep = [i for i in range(count) if areas[i] >= rules.min_pixels]
    if not keep:
        return []
    boxes = [(slices[i][1].start, slices[i][0].start, slices[i][1].stop, slices[i][0].stop)
             for i in keep]
    kept_areas = [int(areas[i]) for i in keep]
    start = None
    if rules.per_person and not footwear:
        # any pixel of a component gives its person: components are inside the foreground
        people = [int(persons[slices[i]][components[slices[i]] == i + 1][0]) for i in keep]
        start = _by_person(people)
    merged = _merge(boxes, kept_areas, rules.merge_gap, start)
    clusters = [_Cluster([keep[k] + 1 for k in c], _cluster_box(boxes, c),
                         sum(kept_areas[k] for k in c)) for c in merged]
    return sorted(clusters, key=lambda c: c.area, reverse=True)


def _kept(clusters: list[_Cluster], shape: tuple[int, int], footwear: bool,
          rules: BoxRules) -> list[_Cluster]:
    """Steps 4 and 5: the clusters that are garments, largest first."""
    if not clusters:
        return []
    min_area = max(rules.min_pixels, rules.min_area * shape[0] * shape[1])
    largest = clusters[0].area
    kept = [c for c in clusters
            if c.area >= min_area and c.area >= rules.min_relative * largest
            and not _is_border_strip(c.box, c.area, shape, rules)]
    if footwear and kept:
        first = kept[0].area
        kept = [kept[0]] + [c for c in kept[1:rules.max_footwear]
                            if c.area >= rules.footwear_relative * first]
    return kept


def regions_from_labels(
    labels: np.ndarray,
    probs: np.ndarray | None = None,
    *,
    groups: tuple[str, ...] = GROUPS,
    garment_groups: tuple[str, ...] = GARMENT_GROUPS,
    rules: BoxRules = BoxRules(),
) -> list[Region]:
    """Garment instances of a label map ``labels`` (H x W group indices into ``groups``;
    index 0 is background, everything else is a person's foreground).

    ``probs`` (G x H x W, per-group probabilities) gives the scores; without it every score
    is 1. Regions come sorted by group order, then top to bottom, left to right.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D label map, got shape {labels.shape}")
    persons = ndimage.label(labels != groups.index("background"), structure=_EIGHT)[0]
    regions: list[Region] = []
    for name in garment_groups:
        index = groups.index(name)
        components, count = ndimage.label(labels == index, structure=_EIGHT)
        if count == 0:
            continue
        footwear = name == "footwear"
        clusters = _group_clusters(components, count, persons, footwear, rules)
        for cluster in _kept(clusters, labels.shape, footwear, rules):
            mask = np.isin(components, cluster.ids)
            score = float(probs[index][mask].mean()) if probs is not None else 1.0
            if score < rules.min_score:
                continue
            regions.append(Region(name, _box_of(mask), score, mask))
    order = {name: i for i, name in enumerate(garment_groups)}
    regions.sort(key=lambda r: (order[r.group], r.box[1], r.box[0]))
    return regions


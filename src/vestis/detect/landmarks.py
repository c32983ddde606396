"""FashionNet-style garment landmarks derived from a garment's mask.

FashionNet (Liu et al., CVPR 2016) pools local features around eight clothing landmarks:
left/right collar, sleeve end, waistline and hem. Without landmark annotations, vestis
reads them off the parser's mask of a garment, as the extreme points of horizontal bands:

- ``collar``: the ends of the top band's middle half (a neckline sits between the shoulders);
- ``sleeve``: the leftmost and rightmost garment pixels (arms out, or the shoulders);
- ``waistline``: the ends of the band at :data:`WAIST_AT` of the garment's height;
- ``hem``: the ends of the bottom band.

Lower-body garments have no collar or sleeves: their waistline is the top band (the
waistband) and those four points are not visible; footwear, bags and headwear have no
landmarks. Coordinates are in the mask's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LANDMARKS = ("left_collar", "right_collar", "left_sleeve", "right_sleeve",
             "left_waistline", "right_waistline", "left_hem", "right_hem")
#: Groups whose garments cover the upper body (collar and sleeves visible).
UPPER_BODY = ("upper", "outer", "dress")
#: Fraction of the garment's height taken as the top and bottom bands.
BAND = 0.06
#: Where the waistline of an upper-body garment lies, as a fraction of its height.
WAIST_AT = {"upper": 0.75, "outer": 0.55, "dress": 0.4}


@dataclass(frozen=True)
class Landmarks:
    """Eight landmarks (:data:`LANDMARKS` order): ``points`` (8, 2) as (x, y) pixels and
    ``visible`` (8,) booleans; an invisible point is (0, 0)."""

    points: np.ndarray
    visible: np.ndarray

    def to_dict(self) -> dict:
        return {name: [round(float(x), 1), round(float(y), 1)]
                for name, (x, y), seen in zip(LANDMARKS, self.points, self.visible, strict=True)
                if seen}

    def normalised(self, width: int, height: int) -> np.ndarray:
        """Points as fractions of the image's width and height."""
        return self.points / np.array([width, height], dtype=np.float32)


def _ends(mask: np.ndarray, top: int, bottom: int) -> tuple[tuple[float, float],
                                                            tuple[float, float]] | None:
    """The leftmost and rightmost garment pixels of rows ``top``..``bottom`` (inclusive)."""
    band = mask[top:bottom + 1]
    ys, xs = np.nonzero(band)
    if not len(xs):
        return None
    left, right = xs.min(), xs.max()
    return ((float(left), float(top + ys[xs == left].mean())),
            (float(right), float(top + ys[xs == right].mean())))


def mask_landmarks(mask: np.ndarray, group: str) -> Landmarks:
    """The landmarks of one garment of ``group`` from its boolean ``mask`` (H x W)."""
    points = np.zeros((len(LANDMARKS), 2), dtype=np.float32)
    visible = np.zeros(len(LANDMARKS), dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows) or group not in (*UPPER_BODY, "lower"):
        return Landmarks(points, visible)
    top, bottom = int(rows[0]), int(rows[-1])
    band = max(1, round(BAND * (bottom - top + 1)))

    def put(index: int, ends) -> None:
        if ends is not None:
            points[index:index + 2] = ends
            visible[index:index + 2] = True

    upper_body = group in UPPER_BODY
    if upper_body:
        top_ends = _ends(mask, top, top + band - 1)
        if top_ends is not None:
            (lx, ly), (rx, ry) = top_ends
            quarter = (rx - lx) / 4
            put(0, ((lx + quarter, ly), (rx - quarter, ry)))
        put(2, _ends(mask, top, bottom))
        waist = top + round(WAIST_AT.get(group, 0.6) * (bottom - top))
        put(4, _ends(mask, waist, min(bottom, waist + band - 1)))
    else:
        put(4, _ends(mask, top, top + band - 1))
    put(6, _ends(mask, bottom - band + 1, bottom))
    return Landmarks(points, visible)


#: The garment groups whose landmarks are described, the first present by area.
DESCRIBED = (*UPPER_BODY, "lower")


def described_garment(group_map: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """The largest upper- or lower-body garment group of a group-index map, and its mask."""
    from vestis.detect.groups import GROUPS

    best, best_area = None, 0
    for group in DESCRIBED:
        area = int((group_map == GROUPS.index(group)).sum())
        if area > best_area:
            best, best_area = group, area
    if best is None:
        return None, None
    return best, group_map == GROUPS.index(best)


def garment_landmarks(group_map: np.ndarray) -> Landmarks:
    """The landmarks of the described garment of a group-index map (none visible if none)."""
    group, mask = described_garment(group_map)
    if group is None:
        return Landmarks(np.zeros((len(LANDMARKS), 2), np.float32),
                         np.zeros(len(LANDMARKS), bool))
    return mask_landmarks(mask, group)

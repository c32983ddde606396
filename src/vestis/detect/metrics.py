"""Parsing quality: a confusion matrix over groups, per-group IoU, mIoU and pixel accuracy;
instance quality per photo (garment groups found, fragments, boxes; :func:`photo_instances`);
and the reader of Clothing Co-Parsing-format datasets (``image,mask`` CSV + ``labels.txt``)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .groups import GARMENT_GROUPS, GROUPS, label_lookup

IGNORE = 255


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int = len(GROUPS)) -> np.ndarray:
    """``num_classes`` x ``num_classes`` pixel counts, rows = truth, columns = prediction.
    Truth pixels equal to 255 are ignored."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    valid = truth != IGNORE
    index = truth[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


@dataclass
class ParsingMetrics:
    """``iou``: per group (NaN where the group is in neither truth nor prediction);
    ``miou``: mean over the garment groups (person and background excluded);
    ``miou_with_person``: mean over garment groups and person; ``pixel_accuracy``: over all
    labelled pixels, background included; ``instances``: the garments found as instances
    (:class:`InstanceMetrics`), when the evaluation parsed them."""

    iou: dict[str, float]
    miou: float
    miou_with_person: float
    pixel_accuracy: float
    images: int
    matrix: np.ndarray = field(repr=False)
    instances: InstanceMetrics | None = None

    def to_dict(self) -> dict:
        clean = {k: (None if math.isnan(v) else round(v, 4)) for k, v in self.iou.items()}
        extra = {"instances": self.instances.to_dict()} if self.instances is not None else {}
        return {
            "images": self.images,
            "miou_garments": round(self.miou, 4),
            "garment_groups": list(GARMENT_GROUPS),
            "iou_person": clean.get("person"),
            "iou_background": clean.get("background"),
            "miou_garments_and_person": round(self.miou_with_person, 4),
            "pixel_accuracy": round(self.pixel_accuracy, 4),
            "iou": clean,
            **extra,
        }


def metrics_from_confusion(matrix: np.ndarray, groups: tuple[str, ...] = GROUPS,
                           images: int = 0) -> ParsingMetrics:
    matrix = matrix.astype(np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    per_group = {name: float(iou[i]) for i, name in enumerate(groups)}
    garments = [per_group[g] for g in GARMENT_GROUPS if not math.isnan(per_group[g])]
    with_person = garments + ([per_group["person"]] if not math.isnan(per_group["person"]) else [])
    total = matrix.sum()
    return ParsingMetrics(
        iou=per_group,
        miou=float(np.mean(garments)) if garments else float("nan"),
        miou_with_person=float(np.mean(with_person)) if with_person else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        images=images,
        matrix=matrix.astype(np.int64),
    )


def format_metrics(metrics: ParsingMetrics) -> str:
    lines = [f"{'group':<12} {'IoU':>7}"]
    for name, value in metrics.iou.items():
        shown = "   n/a" if math.isnan(value) else f"{value:7.4f}"
        lines.append(f"{name:<12} {shown}")
    lines += [
        "",
        f"mIoU over the garment groups ({', '.join(GARMENT_GROUPS)}): {metrics.miou:.4f}",
        f"person IoU (not in the mean): {metrics.iou['person']:.4f}",
        f"background IoU (not in the mean): {metrics.iou['background']:.4f}",
        f"mIoU over garment groups + person: {metrics.miou_with_person:.4f}",
        f"pixel accuracy (all pixels): {metrics.pixel_accuracy:.4f}",
        f"images: {metrics.images}",
    ]
    if metrics.instances is not None:
        lines += ["", "garment instances (boxes), per photo:", format_instances(metrics.instances)]
    return "\n".join(lines)


@dataclass(frozen=True)
class MaskedPhoto:
    image: Path
    mask: Path


def read_labels(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels file not found (one label per line)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_parsing_csv(path: str | Path) -> list[MaskedPhoto]:
    """Rows of a CCP-format CSV (``image,mask`` columns, paths relative to the CSV's folder)
    that have a mask."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        rows = [row for row in reader if (row.get("mask") or "").strip()]
    if not rows:
        raise ValueError(f"{path}: no rows with a mask")
    return [MaskedPhoto(path.parent / r["image"].strip(), path.parent / r["mask"].strip())
            for r in rows]


def load_group_mask(path: Path, lookup: np.ndarray) -> np.ndarray:
    """A CCP mask (values index labels.txt) as group indices (255 for unknown values)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask not found")
    with Image.open(path) as mask:
        array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{path}: a mask must be a one-channel label map, got {array.shape}")
    return lookup[array]


def dataset_lookup(csv_path: str | Path, labels: str | Path | None = None) -> np.ndarray:
    labels_path = Path(labels) if labels else Path(csv_path).parent / "labels.txt"
    return label_lookup(read_labels(labels_path))


# -- garments as instances: groups found, fragments, boxes ---------------------------------
#: Upper-body groups: a photo whose truth has one of them and footwear is "full body".
UPPER_BODY: tuple[str, ...] = ("upper", "outer", "dress")
#: A group is present in a ground-truth mask when it covers at least this fraction of it.
PRESENT_AREA = 0.001


@dataclass(frozen=True)
class PhotoInstances:
    """One photo's instance counts against its mask.

    ``predicted``/``truth``: instances per group (truth: 1 per group present, footwear the
    number of its connected components above :data:`PRESENT_AREA`, at most 2);
    ``fragments``: the predicted instances of a group beyond its true count (beyond one for a
    group the truth lacks, which is a precision error instead); ``box_iou``: per group in
    both, footwear aside, the IoU of the largest predicted instance's box with the box of the
    group's true pixels."""

    predicted: dict[str, int]
    truth: dict[str, int]
    fragments: int
    full_body: bool
    box_iou: dict[str, float]


def true_instances(truth: np.ndarray, groups: tuple[str, ...] = GROUPS) -> dict[str, int]:
    """Garment instances per group of a ground-truth group mask (see :class:`PhotoInstances`)."""
    valid = int((truth != IGNORE).sum())
    floor = max(1, PRESENT_AREA * valid)
    counts = {}
    for name in GARMENT_GROUPS:
        pixels = truth == groups.index(name)
        if pixels.sum() < floor:
            continue
        counts[name] = 1
        if name == "footwear":
            components, count = ndimage.label(pixels, structure=np.ones((3, 3), dtype=bool))
            areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
            counts[name] = int(min(2, max(1, (areas >= floor).sum())))
    return counts


def photo_instances(found: list, truth: np.ndarray, groups: tuple[str, ...] = GROUPS
                    ) -> PhotoInstances:
    """Scores a photo's instances ``found`` (objects with ``group``, ``box`` and ``area``, in
    the mask's pixels) against its ground-truth group mask ``truth``."""
    true = true_instances(truth, groups)
    predicted: dict[str, int] = {}
    for garment in found:
        predicted[garment.group] = predicted.get(garment.group, 0) + 1
    fragments = sum(max(0, n - true.get(g, 1)) for g, n in predicted.items())
    box_iou = {}
    for name in set(predicted) & set(true) - {"footwear"}:
        largest = max((g for g in found if g.group == name), key=lambda g: g.area)
        box_iou[name] = _box_iou(largest.box, _mask_box(truth == groups.index(name)))
    full_body = "footwear" in true and any(g in true for g in UPPER_BODY)
    return PhotoInstances(predicted, true, fragments, full_body, box_iou)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@dataclass
class InstanceMetrics:
    """Per-photo instance quality over a split. ``group_precision``/``group_recall``: over all
    photos' (photo, group) pairs, predicted groups that the truth has / true groups predicted;
    ``fragments``: mean extra instances per photo; ``garments_full_body``: mean instances
    found per full-body photo (truth with footwear and an upper-body group), and the share
    of those with at least two; ``box_iou``: mean, and share at least 0.5, over (photo,
    group) pairs in both, footwear aside."""

    photos: int
    group_precision: float
    group_recall: float
    fragments: float
    full_body_photos: int
    garments_full_body: float
    full_body_two_plus: float
    box_iou: float
    box_iou_50: float
    per_group: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}
        out["per_group"] = {g: {k: round(v, 4) for k, v in d.items()}
                            for g, d in self.per_group.items()}
        return out


def instance_metrics(photos: list[PhotoInstances]) -> InstanceMetrics:
    """Aggregates :func:`photo_instances` over a split (see :class:`InstanceMetrics`)."""
    hits = sum(len(set(p.predicted) & set(p.truth)) for p in photos)
    n_pred = sum(len(p.predicted) for p in photos)
    n_true = sum(len(p.truth) for p in photos)
    full = [sum(p.predicted.values()) for p in photos if p.full_body]
    ious = [v for p in photos for v in p.box_iou.values()]
    return InstanceMetrics(
        photos=len(photos),
        group_precision=hits / n_pred if n_pred else float("nan"),
        group_recall=hits / n_true if n_true else float("nan"),
        fragments=sum(p.fragments for p in photos) / len(photos) if photos else float("nan"),
        full_body_photos=len(full),
        garments_full_body=float(np.mean(full)) if full else float("nan"),
        full_body_two_plus=float(np.mean([n >= 2 for n in full])) if full else float("nan"),
        box_iou=float(np.mean(ious)) if ious else float("nan"),
        box_iou_50=float(np.mean([v >= 0.5 for v in ious])) if ious else float("nan"),
        per_group={g: _group_counts(photos, g) for g in GARMENT_GROUPS},
    )


def _group_counts(photos: list[PhotoInstances], name: str) -> dict[str, float]:
    pred = sum(name in p.predicted for p in photos)
    true = sum(name in p.truth for p in photos)
    both = sum(name in p.predicted and name in p.truth for p in photos)
    extra = sum(max(0, p.predicted.get(name, 0) - p.truth.get(name, 1)) for p in photos)
    return {"precision": both / pred if pred else float("nan"),
            "recall": both / true if true else float("nan"),
            "fragments": extra / len(photos) if photos else float("nan")}


def format_instances(metrics: InstanceMetrics) -> str:
    """The instance metrics as text: per group, then the headline figures."""
    lines = [f"{'group':<12} {'precision':>9} {'recall':>9} {'fragments':>9}"]
    for name, row in metrics.per_group.items():
        cells = ["      n/a" if math.isnan(v) else f"{v:9.3f}" for v in row.values()]
        lines.append(f"{name:<12} " + " ".join(cells))
    lines += [
        "",
        f"garment groups per photo: precision {metrics.group_precision:.3f}, "
        f"recall {metrics.group_recall:.3f} (present: at least {PRESENT_AREA:.1%} of the mask)",
        f"fragments (extra instances of a group) per photo: {metrics.fragments:.3f}",
        f"garments per full-body photo: {metrics.garments_full_body:.2f} "
        f"({metrics.full_body_two_plus:.0%} with 2 or more; {metrics.full_body_photos} photos)",
        f"box IoU of the largest instance with the true group box (footwear aside): "
        f"{metrics.box_iou:.3f} mean, {metrics.box_iou_50:.0%} at least 0.5",
    ]
    return "\n".join(lines)

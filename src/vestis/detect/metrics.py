"""Parsing quality: a confusion matrix over groups, per-group IoU, mIoU and pixel accuracy;
and the reader of Clothing Co-Parsing-format datasets (``image,mask`` CSV + ``labels.txt``)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

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
    labelled pixels, background included."""

    iou: dict[str, float]
    miou: float
    miou_with_person: float
    pixel_accuracy: float
    images: int
    matrix: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        clean = {k: (None if math.isnan(v) else round(v, 4)) for k, v in self.iou.items()}
        return {
            "images": self.images,
            "miou_garments": round(self.miou, 4),
            "garment_groups": list(GARMENT_GROUPS),
            "iou_person": clean.get("person"),
            "iou_background": clean.get("background"),
            "miou_garments_and_person": round(self.miou_with_person, 4),
            "pixel_accuracy": round(self.pixel_accuracy, 4),
            "iou": clean,
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

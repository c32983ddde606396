"""Attribute prediction metrics: DeepFashion's per-attribute top-k recall and mAP.

- **top-k recall** of an attribute value: among images that have it, the share whose k most
  likely values of its family include it (DeepFashion's attribute protocol, per family);
- **AP** of a value: average precision of ranking all images by its probability; **mAP** the
  mean over values that occur among the scored images.
- **prior**: the label-frequency baseline scores every image with each value's training
  frequency. Its ranking is a tie, so its AP is the value's prevalence (the expected AP of
  a random order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    relevant = np.asarray(relevant, dtype=bool)
    if not relevant.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = relevant[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def label_map(scores: np.ndarray, targets: np.ndarray, columns: Sequence[int]) -> float:
    aps = [average_precision(scores[:, j], targets[:, j] > 0) for j in columns]
    aps = [ap for ap in aps if not np.isnan(ap)]
    return float(np.mean(aps)) if aps else float("nan")


def prior_map(targets: np.ndarray, columns: Sequence[int]) -> float:
    prevalence = [targets[:, j].mean() for j in columns if targets[:, j].any()]
    return float(np.mean(prevalence)) if prevalence else float("nan")


def top_k_recall(scores: np.ndarray, targets: np.ndarray, part: slice, k: int) -> float:
    """Share of (image, true value) pairs of one family found in that family's top k."""
    block, truth = scores[:, part], targets[:, part] > 0
    if not truth.any():
        return float("nan")
    k = min(k, block.shape[1])
    top = np.argsort(-block, axis=1)[:, :k]
    found = np.zeros_like(truth)
    np.put_along_axis(found, top, True, axis=1)
    return float((found & truth).sum() / truth.sum())


def attribute_report(scores: np.ndarray, targets: np.ndarray, slices: Mapping[str, slice],
                     prior: np.ndarray, ks: Sequence[int] = (1, 3, 5)) -> dict:
    """Per family: mAP, the prior's mAP and top-k recall (model and prior), plus the overall
    mAP over all values of the given families."""
    prior_scores = np.broadcast_to(prior, scores.shape)
    families, all_columns = {}, []
    for family, part in slices.items():
        columns = list(range(part.start, part.stop))
        all_columns += columns
        families[family] = {
            "values": int(sum(targets[:, j].any() for j in columns)),
            "mAP": label_map(scores, targets, columns),
            "prior_mAP": prior_map(targets, columns),
            **{f"top{k}_recall": top_k_recall(scores, targets, part, k) for k in ks},
            **{f"prior_top{k}_recall": top_k_recall(prior_scores, targets, part, k) for k in ks},
        }
    return {"images": int(len(scores)), "families": families,
            "mAP": label_map(scores, targets, all_columns),
            "prior_mAP": prior_map(targets, all_columns)}

"""``evaluate()``: load a benchmark, embed its images, compute metrics, write a report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vestis.evaluation.datasets import EvalDataset, Sample, load_dataset
from vestis.evaluation.metrics import RetrievalResult, retrieval_metrics
from vestis.evaluation.report import write_metrics_json, write_report
from vestis.models import DEFAULT_MODEL, Encoder


def evaluate(
    dataset: str | Path | EvalDataset,
    model: str | Path | Encoder = DEFAULT_MODEL,
    *,
    format: str | None = None,
    split: str = "test",
    batch_size: int = 32,
    progress: bool = True,
    report_dir: str | Path | None = None,
    json_path: str | Path | None = None,
) -> RetrievalResult:
    """Evaluate ``model`` (a registry name, a checkpoint path or an :class:`Encoder`) on
    ``dataset`` (a path read by :func:`load_dataset`, or an :class:`EvalDataset`).

    Optionally writes a full report to ``report_dir`` and the metrics JSON to ``json_path``.
    """
    if not isinstance(dataset, EvalDataset):
        dataset = load_dataset(dataset, format, split=split)
    encoder = (
        model if isinstance(model, Encoder) else Encoder.from_name(model, batch_size=batch_size)
    )
    query_emb, gallery_emb = embed_dataset(encoder, dataset, progress=progress)
    result = retrieval_metrics(
        query_emb,
        dataset.query_ids,
        gallery_emb,
        dataset.gallery_ids,
        query_gallery_index=dataset.query_gallery_index,
    )
    if report_dir is not None:
        write_report(result, dataset, Path(report_dir), model_name=encoder.name)
    if json_path is not None:
        write_metrics_json(json_path, result, dataset, model_name=encoder.name)
    return result


def embed_dataset(
    encoder: Encoder, dataset: EvalDataset, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery embeddings, embedding every distinct (image, box) only once.

    In leave-one-out the queries are gallery rows, so they cost nothing extra.
    """
    keys = {_key(sample): None for sample in dataset.gallery + dataset.queries}
    unique = list(keys)
    boxes = [box for _, box in unique]
    vectors = encoder.embed(
        [path for path, _ in unique],
        boxes if any(box is not None for box in boxes) else None,
        progress=progress,
    )
    row = {key: i for i, key in enumerate(unique)}
    query_rows = [row[_key(sample)] for sample in dataset.queries]
    gallery_rows = [row[_key(sample)] for sample in dataset.gallery]
    return vectors[query_rows], vectors[gallery_rows]


def _key(sample: Sample) -> tuple[Path, tuple[int, int, int, int] | None]:
    return sample.path, sample.bbox

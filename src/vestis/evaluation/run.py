"""``evaluate()``: load a benchmark, embed its images, compute metrics with intervals, write
a report; ``compare()``: two models on the same queries; ``compare_rerank()``: a model's
ranking with and without the learned re-ranker, on the same queries."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from vestis.defaults import EVAL_BATCH_SIZE
from vestis.evaluation.datasets import EvalDataset, load_dataset
from vestis.evaluation.metrics import RetrievalResult, retrieval_metrics
from vestis.evaluation.report import (
    write_comparison_json,
    write_comparison_report,
    write_metrics_json,
    write_report,
)
from vestis.evaluation.uncertainty import (
    N_BOOTSTRAP,
    Comparison,
    bootstrap_intervals,
    compare_results,
)
from vestis.models import DEFAULT_MODEL, Encoder
from vestis.models.matcher import (
    DEFAULT_MATCHER,
    RERANK_K,
    Matcher,
    load_matcher,
    rerank_scores,
)
from vestis.records import ImageRecord
from vestis.views import in_context, locate_groups

#: How ``evaluate`` crops images without a box: see :func:`evaluate`. ``auto`` is what a
#: catalog indexed with no ``crop`` choice stores (:data:`vestis.catalog.garments.DEFAULT_CROP`).
CROPS = ("auto", "none", "garment", "largest")


def evaluate(
    dataset: str | Path | EvalDataset,
    model: str | Path | Encoder = DEFAULT_MODEL,
    *,
    format: str | None = None,
    split: str = "test",
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = True,
    report_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    crop: str = "auto",
    n_boot: int = N_BOOTSTRAP,
) -> RetrievalResult:
    """Evaluate ``model`` (a registry name, a checkpoint path or an :class:`Encoder`) on
    ``dataset`` (a path read by :func:`load_dataset`, or an :class:`EvalDataset`).

    ``crop`` (images without a box of their own), each as a catalog indexed with that
    ``crop`` stores its photos: ``auto`` (the default, as ``vestis index`` with no flag)
    the garment each image's category names, the whole photo when it names none;
    ``garment`` the same, but the largest garment found when the category names none;
    ``none`` whole photos; ``largest`` the largest garment found, ignoring categories.
    The result's ``intervals`` hold 95 % bootstrap intervals of the headline metrics
    (``n_boot`` resamples; :mod:`vestis.evaluation.uncertainty`).
    Optionally writes a full report to ``report_dir`` and the metrics JSON to ``json_path``.
    """
    dataset = prepare_dataset(dataset, format=format, split=split, crop=crop, progress=progress)
    encoder = _encoder(model, batch_size)
    result = score_dataset(encoder, dataset, progress=progress, n_boot=n_boot)
    if report_dir is not None:
        write_report(result, dataset, Path(report_dir), model_name=encoder.name)
    if json_path is not None:
        write_metrics_json(json_path, result, dataset, model_name=encoder.name)
    return result


def compare(
    dataset: str | Path | EvalDataset,
    model_a: str | Path | Encoder,
    model_b: str | Path | Encoder,
    *,
    format: str | None = None,
    split: str = "test",
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = True,
    report_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    crop: str = "none",
    n_boot: int = N_BOOTSTRAP,
) -> tuple[RetrievalResult, RetrievalResult, Comparison]:
    """Both models on the same queries (and the same garment boxes), and their paired
    comparison: each metric's ``a - b`` with a bootstrap interval, and the queries that one
    gets right at rank 1 and the other does not."""
    dataset = prepare_dataset(dataset, format=format, split=split, crop=crop, progress=progress)
    encoders = [_encoder(model, batch_size) for model in (model_a, model_b)]
    result_a, result_b = (score_dataset(encoder, dataset, progress=progress, n_boot=n_boot)
                          for encoder in encoders)
    comparison = compare_results(result_a, result_b, bootstrap_groups(result_a, dataset),
                                 n_boot=n_boot)
    names = (encoders[0].name, encoders[1].name)
    if report_dir is not None:
        write_comparison_report(comparison, result_a, dataset, Path(report_dir), names)
    if json_path is not None:
        write_comparison_json(json_path, comparison, result_a, dataset, names)
    return result_a, result_b, comparison


def compare_rerank(
    dataset: str | Path | EvalDataset,
    model: str | Path | Encoder = DEFAULT_MODEL,
    matcher: str | Path | Matcher = DEFAULT_MATCHER,
    *,
    rerank_k: int = RERANK_K,
    format: str | None = None,
    split: str = "test",
    batch_size: int = 32,
    progress: bool = True,
    json_path: str | Path | None = None,
    crop: str = "none",
    n_boot: int = N_BOOTSTRAP,
) -> tuple[RetrievalResult, RetrievalResult, Comparison]:
    """``vestis eval --rerank``: the model's ranking re-ranked by ``matcher`` (each query's
    top ``rerank_k`` re-ordered by the matcher, the rest below in their order), the plain
    ranking, and their paired comparison (re-ranked minus plain), on the same vectors."""
    dataset = prepare_dataset(dataset, format=format, split=split, crop=crop, progress=progress)
    encoder = _encoder(model, batch_size)
    matcher = load_matcher(matcher)
    matcher.check(encoder.model_id, encoder.dim)
    query_emb, gallery_emb = embed_dataset(encoder, dataset, progress=progress)
    plain = score_vectors(query_emb, gallery_emb, dataset, n_boot)
    reranked = score_vectors(query_emb, gallery_emb, dataset, n_boot, matcher, rerank_k)
    comparison = compare_results(reranked, plain, bootstrap_groups(plain, dataset),
                                 n_boot=n_boot)
    if json_path is not None:
        names = (f"{encoder.name} + {matcher.name} (top {rerank_k})", encoder.name)
        write_comparison_json(json_path, comparison, reranked, dataset, names)
    return reranked, plain, comparison


def rerank_metrics(query_emb: np.ndarray, gallery_emb: np.ndarray, dataset: EvalDataset,
                   matcher: Matcher, rerank_k: int = RERANK_K) -> RetrievalResult:
    """Metrics (with the fair tie rule) of the plain ranking with each query's top
    ``rerank_k`` re-ordered by ``matcher`` (:func:`vestis.models.matcher.rerank_scores`)."""
    scores = rerank_scores(query_emb @ gallery_emb.T, query_emb, gallery_emb, matcher,
                           rerank_k, dataset.query_gallery_index)
    # The scores as "query vectors" against the identity: the ranking metrics read a score
    # matrix unchanged (exact in float32), whatever made it.
    identity = np.eye(len(gallery_emb), dtype=np.float32)
    return retrieval_metrics(scores.astype(np.float32), dataset.query_ids, identity,
                             dataset.gallery_ids,
                             query_gallery_index=dataset.query_gallery_index)


def score_vectors(query_emb, gallery_emb, dataset: EvalDataset, n_boot: int = N_BOOTSTRAP,
                  matcher: Matcher | None = None, rerank_k: int = RERANK_K
                  ) -> RetrievalResult:
    """Metrics with intervals of vectors already embedded, re-ranked by ``matcher`` if
    given."""
    if matcher is None:
        result = retrieval_metrics(query_emb, dataset.query_ids, gallery_emb,
                                   dataset.gallery_ids,
                                   query_gallery_index=dataset.query_gallery_index)
    else:
        result = rerank_metrics(query_emb, gallery_emb, dataset, matcher, rerank_k)
    if n_boot:
        result.intervals = bootstrap_intervals(result.per_query(),
                                               bootstrap_groups(result, dataset), n_boot=n_boot)
    return result


def prepare_dataset(dataset: str | Path | EvalDataset, *, format: str | None = None,
                    split: str = "test", crop: str = "auto", progress: bool = False
                    ) -> EvalDataset:
    """The dataset read (if a path) and, with ``crop``, boxed to its garments."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if not isinstance(dataset, EvalDataset):
        dataset = load_dataset(dataset, format, split=split)
    if crop != "none":
        dataset = with_garment_boxes(dataset, use_category=crop != "largest",
                                     whole_without_group=crop == "auto", progress=progress)
    return dataset


def score_dataset(encoder: Encoder, dataset: EvalDataset, *, progress: bool = False,
                  n_boot: int = N_BOOTSTRAP) -> RetrievalResult:
    """Embed ``dataset`` with ``encoder``; metrics with their bootstrap intervals."""
    query_emb, gallery_emb = embed_dataset(encoder, dataset, progress=progress)
    result = retrieval_metrics(
        query_emb,
        dataset.query_ids,
        gallery_emb,
        dataset.gallery_ids,
        query_gallery_index=dataset.query_gallery_index,
    )
    if n_boot:
        result.intervals = bootstrap_intervals(result.per_query(),
                                               bootstrap_groups(result, dataset), n_boot=n_boot)
    return result


def bootstrap_groups(result: RetrievalResult, dataset: EvalDataset) -> list[str] | None:
    """Resampling units: the query's item for instance benchmarks, none (each query on its
    own) for category benchmarks, where one class holds hundreds of queries."""
    if dataset.match == "category":
        return None
    return [dataset.queries[i].item_id for i in result.query_indices]


def _encoder(model: str | Path | Encoder, batch_size: int) -> Encoder:
    return model if isinstance(model, Encoder) else Encoder.from_name(model,
                                                                      batch_size=batch_size)


def embed_dataset(
    encoder: Encoder, dataset: EvalDataset, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery embeddings, embedding every distinct (image, box) only once.

    In leave-one-out the queries are gallery rows, so they cost nothing extra.
    """
    keys = {_key(sample): None for sample in dataset.gallery + dataset.queries}
    unique = list(keys)
    paths = [path for path, _, _ in unique]
    boxes = [box for _, box, _ in unique]
    vectors = encoder.embed(
        paths, boxes if any(box is not None for box in boxes) else None, progress=progress
    )
    context = [i for i, (_, box, context) in enumerate(unique) if context and box]
    if context:  # their crops are embedded above; add their whole photos' vectors
        whole = encoder.embed([paths[i] for i in context], progress=progress)
        vectors[context] = in_context(whole, vectors[context])
    row = {key: i for i, key in enumerate(unique)}
    query_rows = [row[_key(sample)] for sample in dataset.queries]
    gallery_rows = [row[_key(sample)] for sample in dataset.gallery]
    return vectors[query_rows], vectors[gallery_rows]


def with_garment_boxes(dataset: EvalDataset, *, use_category: bool = True,
                       whole_without_group: bool = False, parser=None,
                       progress: bool = False) -> EvalDataset:
    """``dataset`` with every box-less sample boxed to its garment (see
    :func:`vestis.detect.categories.product_box`), embedded in its photo's context; the whole
    photo where no garment is trusted. ``whole_without_group``: a sample whose category
    names no garment group stays whole (else it gets the largest garment); no photo is
    parsed when none names one."""
    from tqdm.auto import tqdm

    from vestis.detect import load_parser
    from vestis.detect.categories import category_group

    def group_of(sample: ImageRecord) -> str | None:
        return category_group(sample.category) if use_category else None

    def parsed(sample: ImageRecord) -> bool:
        return sample.box is None and not (whole_without_group and group_of(sample) is None)

    groups: dict[Path, set[str | None]] = {}
    for sample in dataset.gallery + dataset.queries:
        if parsed(sample):
            groups.setdefault(sample.path, set()).add(group_of(sample))
    if not groups:
        return dataset
    parser = parser or load_parser()
    boxes: dict[tuple[Path, str | None], tuple[int, int, int, int] | None] = {}
    for path, wanted in tqdm(groups.items(), desc="finding garments", unit="img",
                             disable=not progress):
        for group, (box, _) in locate_groups(parser, path, wanted).items():
            boxes[(path, group)] = box

    def boxed(sample: ImageRecord) -> ImageRecord:
        if not parsed(sample):
            return sample
        box = boxes[(sample.path, group_of(sample))]
        return replace(sample, box=box, in_context=box is not None)

    return replace(dataset, queries=[boxed(s) for s in dataset.queries],
                   gallery=[boxed(s) for s in dataset.gallery])


def _key(sample: ImageRecord) -> tuple[Path, tuple[int, int, int, int] | None, bool]:
    return sample.path, sample.box, sample.in_context

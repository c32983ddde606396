"""``vestis adapt``: learn a shop from its own catalog.

A shop's catalog labels itself: photos that share an ``item_id`` are views of one product.
Adaptation embeds every photo with the base model and learns a linear map of the base
vectors (:class:`AdaptedNet`):

- ``reweight``, for a base whose vector joins blocks (the default model: its backbone's
  ImageNet features and its trained vector, :meth:`~vestis.models.hooks.ModelHooks.
  vector_parts`): the share of each block, chosen on the training products (leave-one-out
  among their photos, the mean of R@1 and AP, over shares 0, 0.1, ..., 1 of the first
  block). A shop whose photos look like the training data's (studio shots of models) leans
  on the trained vector, one whose photos do not leans on ImageNet's. Two numbers, so a few
  products pin them.
- ``whiten``, for a one-block base (ImageNet features): the within-item whitening
  ``W = ((1 - s) C + s I)^(-1/2)`` of the base vectors of each training photo and a few
  augmented views of it, with ``C`` their covariance around their item's mean (scaled to
  unit average variance) and ``s`` the ``shrinkage`` toward the identity. Directions along
  which views of one product differ (the shop's backgrounds, poses, lighting) shrink; the
  others keep the base's geometry. Whitening the default model's vectors, alone or after
  the re-weighting, was tried on the k-fold models' unseen Luma products (scratch runs,
  not a committed benchmark) and did worse than the re-weighting alone, so a joined base is
  only re-weighted.

Both are closed-form (no learning rate, no epochs) and take a second; a few hundred photos
take about a minute on a 2-core CPU, nearly all of it embedding. Learning the map by SGD on
a triplet loss was tried first: on the same splits it barely moved held-out R@1.

It checks itself first, by cross-validation over products: the products (grouped by a
``product`` column when the source has one, so that colours of one design stay together)
are dealt into ``round(1 / holdout)`` folds; each fold's photos search every photo the map
did not learn from (the fold's, and single-photo items' as distractors) with a map learnt
on the other folds, and with the base.
Every product is thus checked once, by a map that never saw it, and the per-query values
are pooled (paired bootstrap interval, items resampled whole). Unless the map is better beyond
the noise (the 95 % interval of its gain in R@1 and AP, averaged, lies above 0), the
written checkpoint is the base unchanged (the identity map) and the report says so.
Otherwise the map is learnt again on every product and written.

:func:`adapt_catalog` does the same on a catalog's own images, then (when the map was kept)
re-embeds the catalog with it, crash-safe (:mod:`vestis.catalog.reembed`): a directory or a
Milvus catalog.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vestis.catalog import Catalog
from vestis.catalog.backend import store_kind
from vestis.catalog.garments import DEFAULT_CROP, GarmentCropper, check_crop_mode
from vestis.catalog.local import DB_NAME
from vestis.catalog.reembed import RunnerFactory, catalog_records, embed_views, reembed
from vestis.catalog.sources import read_source
from vestis.catalog.stores import store_exists
from vestis.data import build_train_transform, split_by_group
from vestis.evaluation import (
    Comparison,
    bootstrap_intervals,
    compare_values,
    retrieval_metrics,
)
from vestis.images import ImageError, crop_box, is_uri, load_image
from vestis.models import DEFAULT_MODEL, Encoder, save_checkpoint
from vestis.models.adapted import AdaptedNet, apply_map
from vestis.records import ImageRecord

#: ``holdout``: share of products each check fold holds out; ``views``: vectors per photo
#: (its own and augmented ones); ``shrinkage``: weight of the identity in the whitening.
DEFAULTS: dict[str, Any] = {"holdout": 0.3, "views": 4, "shrinkage": 0.3, "seed": 0}
MIN_ITEMS = 4  # multi-photo items needed to train (and as many again to check)
#: The first block's shares tried when a base's vector joins two (the second gets the rest).
SHARES = tuple(i / 10 for i in range(11))


@dataclass
class AdaptReport:
    """What ``adapt`` did: held-out figures of base and adapted map, and whether it kept it."""

    base: str
    out: Path
    kept: bool
    photos: int
    #: Items with two or more photos: what the map learns from and the check scores.
    items: int
    #: Folds of the check: each scores its products with a map learnt on the others.
    check_folds: int
    queries: int
    #: ``identity`` (not kept), ``reweight`` or ``whiten`` (see the module docstring).
    map: str = "identity"
    #: Each block of the base's vector and its share in the written map.
    shares: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)
    adapted_metrics: dict[str, float] = field(default_factory=dict)
    difference: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


def adapt(
    source: str | Path | list,
    out: str | Path,
    *,
    base: str = DEFAULT_MODEL,
    minutes: float = 10.0,
    progress: bool = True,
    crop: str = DEFAULT_CROP,
    **settings: Any,
) -> AdaptReport:
    """Adapt ``base`` to the shop in ``source`` (a folder or CSV, as for ``vestis index``)
    and write the checkpoint ``out`` (usable as a model name anywhere). Augmented views stop
    after ``minutes`` (from the start); every photo keeps at least its own vector.

    Photos are embedded as ``vestis index --crop CROP`` stores them (by default the garment
    their category names, in their photo's context). ``source`` may instead be records whose
    boxes are already chosen (a catalog's, :func:`vestis.catalog.reembed.catalog_records`,
    each box ``in_context`` where the parser found it), with ``crop="none"``: then nothing is
    parsed."""
    started = time.perf_counter()
    options = _settings(settings)
    records = _cropped(read_source(source), check_crop_mode(crop), progress)
    samples = _readable_samples(records, progress)
    folds = _check_folds(samples, options)
    multi = [sample for fold in folds for sample in fold]
    encoder = Encoder.from_name(base)
    parts = encoder.model.vector_parts() if encoder.model is not None else [
        ("vector", encoder.dim, 1.0)]
    vectors = _stored_vectors(encoder, samples, progress)
    views = _views_by_photo(encoder, multi, vectors, samples, options,
                            started + minutes * 60, progress) if len(parts) == 1 else {}
    checks = []
    for k, fold in enumerate(folds):
        rest = [sample for j, other in enumerate(folds) if j != k for sample in other]
        _, weight, _ = _learn_map(parts, vectors, samples, rest, views, options)
        checks.append(_check_values(weight, vectors, samples, fold,
                                    {sample.path for sample in rest}))
    comparison, gain = _pooled(checks)
    if gain[0] > 0:  # the check passed: learn the map from every product
        kind, weight, shares = _learn_map(parts, vectors, samples, multi, views, options)
    else:
        kind, weight = "identity", None
        shares = {name: round(share, 6) for name, _, share in parts}
    report = AdaptReport(
        base=base, out=Path(out), kept=kind != "identity", photos=len(samples),
        items=_count_items(multi), check_folds=len(folds), queries=comparison.n_queries,
        map=kind, shares=shares, base_metrics=comparison.metrics_b,
        adapted_metrics=comparison.metrics_a, difference=comparison.difference,
        intervals=comparison.intervals, seconds=time.perf_counter() - started)
    _save(base, weight, report)
    return report


def _learn_map(parts, vectors: np.ndarray, samples: list[ImageRecord],
               chosen: list[ImageRecord], views: dict[Path, np.ndarray], options: dict
               ) -> tuple[str, torch.Tensor, dict[str, float]]:
    """``(kind, map, shares)`` learnt on the ``chosen`` photos: for a base whose vector
    joins blocks, the blocks' shares chosen on the photos' own vectors (the map: a scale
    per dimension); for a one-block base, the within-item whitening of their ``views`` (per
    photo: its vectors; the map: a square matrix)."""
    if len(parts) > 1:
        row = {sample.path: i for i, sample in enumerate(samples)}
        shares = choose_shares(parts, vectors[[row[sample.path] for sample in chosen]],
                               [sample.item_id for sample in chosen])
        scale = torch.from_numpy(part_scales(parts, shares)).float()
        return "reweight", scale, {
            name: share for (name, _, _), share in zip(parts, shares, strict=True)}
    rows = np.concatenate([views[sample.path] for sample in chosen])
    labels = [sample.item_id for sample in chosen for _ in range(len(views[sample.path]))]
    whiten = fit_map(torch.from_numpy(rows), _coded(labels), options["shrinkage"])
    return "whiten", whiten.float(), {parts[0][0]: parts[0][2]}


def part_scales(parts: list[tuple[str, int, float]], shares) -> np.ndarray:
    """Per dimension, the factor that moves each block of a vector from its share in
    ``parts`` to its share in ``shares``."""
    return np.concatenate([np.full(width, (new / old) ** 0.5 if old > 0 else 1.0)
                           for (_, width, old), new in zip(parts, shares, strict=True)])


def choose_shares(parts: list[tuple[str, int, float]], vectors: np.ndarray,
                  labels: list[str]) -> tuple[float, ...]:
    """The blocks' shares that best retrieve ``vectors``' items (leave-one-out, the mean of
    R@1 and AP), over :data:`SHARES` for a two-block vector; ties keep the base's. A
    one-block vector keeps its share."""
    current = tuple(share for _, _, share in parts)
    if len(parts) != 2:
        return current
    candidates = sorted({(share, round(1.0 - share, 6)) for share in SHARES},
                        key=lambda pair: abs(pair[0] - current[0]))
    return max([current] + candidates, key=lambda pair: _loo_score(
        vectors * part_scales(parts, pair), labels))


def _loo_score(vectors: np.ndarray, labels: list[str]) -> float:
    result = retrieval_metrics(vectors, labels, vectors, labels, ks=(1,),
                               query_gallery_index=np.arange(len(labels)))
    return round((result.metrics["R@1"] + result.metrics["mAP"]) / 2, 9)


@dataclass
class CatalogAdaptReport:
    """What ``adapt_catalog`` did: the adaptation, and the images re-embedded (0: none,
    the catalog is unchanged)."""

    adapt: AdaptReport
    reembedded: int = 0
    seconds: float = 0.0


def adapt_catalog(
    catalog: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    minutes: float = 10.0,
    progress: bool = True,
    swap: Callable | None = None,
    runner: RunnerFactory | None = None,
    **settings: Any,
) -> CatalogAdaptReport:
    """:func:`adapt` on the images of catalog ``catalog`` (a directory or a Milvus URI;
    ``base``: default its own model); when the map is kept, the catalog is re-embedded with
    ``out`` and swapped in whole (:func:`vestis.catalog.reembed.reembed`; ``swap`` replaces
    its last step, for tests; ``runner``: where the re-embedding runs, e.g. Ray). A write to
    the catalog meanwhile leaves it unchanged (an error)."""
    started = time.perf_counter()
    old = _open_existing(catalog)
    path = old.location
    try:
        records = catalog_records(old)
        missing = [str(record.path) for record in records
                   if not is_uri(record.path) and not Path(record.path).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) of catalog {path} have no file to "
                             f"re-embed (first: {missing[0]}); nothing was changed")
        report = adapt(records, out, base=base or old.model_name, minutes=minutes,
                       progress=progress, crop="none", **settings)
        count = 0
        if report.kept:
            count = reembed(old, str(Path(out).expanduser().resolve()), progress=progress,
                            swap=swap, runner=runner)
    finally:
        old.close()
    return CatalogAdaptReport(report, count, time.perf_counter() - started)


def _open_existing(catalog: str | Path) -> Catalog:
    """The catalog at ``catalog``, which must exist (a swap cut short is finished first)."""
    milvus = store_kind(str(catalog)) == "milvus"
    location = str(catalog) if milvus else Path(catalog).expanduser()
    if not store_exists(location):
        raise FileNotFoundError(f"{location}: no such Milvus catalog" if milvus
                                else f"{location}: not a vestis catalog (no {DB_NAME})")
    return Catalog(location)


def _settings(settings: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown adapt setting(s): {', '.join(unknown)}; known: "
                         f"{', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **settings}
    if not 0 < options["holdout"] < 1:
        raise ValueError(f"holdout must be between 0 and 1, got {options['holdout']}")
    if not 0 <= options["shrinkage"] <= 1:
        raise ValueError(f"shrinkage must be between 0 and 1, got {options['shrinkage']}")
    if not isinstance(options["views"], int) or options["views"] < 1:
        raise ValueError(f"views must be a positive integer, got {options['views']}")
    return options


def _readable_samples(records: list[ImageRecord], progress: bool) -> list[ImageRecord]:
    """One sample per photo that decodes; the others are reported and skipped."""
    samples = []
    for record in tqdm(records, desc="checking photos", unit="img", disable=not progress):
        try:
            load_image(record.path)
        except (ImageError, OSError) as exc:
            tqdm.write(f"skipped {record.path}: {exc}")
            continue
        group = str(record.metadata.get("product") or record.item_id)
        samples.append(ImageRecord(Path(record.path), record.item_id, group=group,
                                   box=record.box, in_context=record.in_context))
    return samples


def _check_folds(samples: list[ImageRecord], options: dict) -> list[list[ImageRecord]]:
    """The photos of multi-photo items dealt into ``round(1 / holdout)`` folds (at least
    2), whole products in one fold: each fold is checked once by a map learnt on the
    others."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.item_id] = counts.get(sample.item_id, 0) + 1
    multi = [sample for sample in samples if counts[sample.item_id] >= 2]
    if _count_items(multi) < 2 * MIN_ITEMS:
        raise ValueError(f"adapting needs at least {2 * MIN_ITEMS} items with two or more "
                         f"photos (found {_count_items(multi)}): nothing to learn or check")
    count = max(2, round(1 / options["holdout"]))
    return [split_by_group(multi, lambda sample: sample.group, seed=options["seed"], fold=k,
                           folds=count)[1] for k in range(count)]


def _count_items(samples: list[ImageRecord]) -> int:
    return len({sample.item_id for sample in samples})


def _cropped(records: list[ImageRecord], crop: str, progress: bool) -> list[ImageRecord]:
    """``records`` with the boxes ``vestis index --crop CROP`` gives them, ``in_context``
    where the parser found the box."""
    if crop == "none":
        return records
    cropped = GarmentCropper().crop(records, crop, progress=progress)
    return [replace(after, in_context=True) if before.box is None and after.box is not None
            else after for before, after in zip(records, cropped, strict=True)]


def _stored_vectors(encoder: Encoder, samples: list[ImageRecord], progress: bool
                    ) -> np.ndarray:
    """Each photo's vector as a catalog stores it (:func:`embed_views`)."""
    vectors, errors = embed_views(encoder, encoder, [s.path for s in samples],
                                  [s.box for s in samples],
                                  [s.in_context for s in samples], progress=progress)
    if errors:
        raise ValueError(f"{len(errors)} photo(s) could not be embedded (first: {errors[0]})")
    return vectors


def _views_by_photo(encoder, chosen, vectors, samples, options, deadline: float,
                    progress) -> dict[Path, np.ndarray]:
    """Per chosen photo, its base vectors: its plain one and ``views - 1`` augmented ones
    (augmented views stop at ``deadline``, a ``time.perf_counter()`` value)."""
    row = {sample.path: i for i, sample in enumerate(samples)}
    out = {sample.path: vectors[[row[sample.path]]] for sample in chosen}
    augment = build_train_transform(None, encoder.preprocess, seed=options["seed"])
    extra = options["views"] - 1
    for sample in tqdm(chosen, desc="augmented views", unit="img",
                       disable=not progress or extra < 1):
        if extra < 1 or time.perf_counter() > deadline:
            break
        image = crop_box(load_image(sample.path), sample.box)
        augmented = _embed_arrays(encoder, [augment(image) for _ in range(extra)])
        out[sample.path] = np.concatenate([out[sample.path], augmented])
    return out


def _coded(labels: list[str]) -> torch.Tensor:
    codes = {label: code for code, label in enumerate(dict.fromkeys(labels))}
    return torch.tensor([codes[label] for label in labels])


def _embed_arrays(encoder: Encoder, arrays: list[np.ndarray]) -> np.ndarray:
    batch = encoder.batch_size
    return np.concatenate([encoder.embed_arrays(np.stack(arrays[i:i + batch]))
                           for i in range(0, len(arrays), batch)])


def fit_map(vectors: torch.Tensor, labels: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """The ``(dim, dim)`` within-item whitening of ``vectors`` (rows grouped by ``labels``),
    shrunk toward the identity by ``shrinkage`` (1: the identity)."""
    x = vectors.double()
    count = int(labels.max()) + 1
    means = torch.zeros(count, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means /= torch.bincount(labels, minlength=count).clamp_min(1).unsqueeze(1).double()
    residual = x - means[labels]
    within = residual.T @ residual / len(x)
    within /= torch.trace(within).clamp_min(1e-12) / x.shape[1]
    blended = (1 - shrinkage) * within + shrinkage * torch.eye(x.shape[1], dtype=torch.float64)
    values, vectors_ = torch.linalg.eigh(blended)
    return (vectors_ * values.clamp_min(1e-9).rsqrt()) @ vectors_.T


def _check_values(weight: torch.Tensor, vectors: np.ndarray, samples: list[ImageRecord],
                  fold: list[ImageRecord], learnt: set[Path]) -> tuple[dict, dict, list[str]]:
    """Per-query values of the adapted and the base vectors for one check fold's photos,
    each searching every photo the map did not learn from (the fold's and the single-photo
    items', which are distractors); and each query's item."""
    unseen = [i for i, sample in enumerate(samples) if sample.path not in learnt]
    gallery = vectors[unseen]
    labels = [samples[i].item_id for i in unseen]
    position = {samples[i].path: j for j, i in enumerate(unseen)}
    queries = np.array([position[sample.path] for sample in fold])
    adapted = F.normalize(apply_map(torch.from_numpy(gallery), weight), dim=1).numpy()
    results = [retrieval_metrics(v[queries], [labels[i] for i in queries], v, labels,
                                 ks=(1, 10), query_gallery_index=queries)
               for v in (adapted, gallery)]
    return (results[0].per_query(), results[1].per_query(),
            [labels[queries[i]] for i in results[0].query_indices])


def _pooled(checks: list[tuple[dict, dict, list[str]]]) -> tuple[Comparison, tuple]:
    """Adapted against base over every check fold's queries; and the 95 % interval of the
    gain in (R@1 + AP) / 2, whose lower bound must exceed 0 for the map to be kept (a gain
    within the noise of a small check is not one)."""
    adapted, base = ({name: np.concatenate([check[side][name] for check in checks])
                      for name in checks[0][side]} for side in (0, 1))
    groups = [label for check in checks for label in check[2]]
    gain = {"score": (adapted["R@1"] - base["R@1"] + adapted["mAP"] - base["mAP"]) / 2}
    return compare_values(adapted, base, groups), bootstrap_intervals(gain, groups)["score"]


def _save(base: str, weight: torch.Tensor | None, report: AdaptReport) -> None:
    model = AdaptedNet.with_map(base, weight)
    save_checkpoint(model, report.out, include_backbone=False, meta={"adapt": report.to_dict()})

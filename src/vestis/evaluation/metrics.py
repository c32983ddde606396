"""Retrieval metrics computed with blocked matrix products.

Similarity is the dot product of the embeddings (the caller L2-normalises them). Queries are
processed in blocks: one ``(block, n_gallery)`` similarity matrix at a time, so memory stays
bounded and nothing loops per query or per pair.

Ties never help. Every metric is its *expected value when gallery items with equal scores
are ranked in a uniformly random order* (McSherry and Najork, "Computing information
retrieval performance measures efficiently in the presence of tied scores", ECIR 2008):
a positive tied with negatives is, on average, ranked among them, so a model that gives
every image the same vector scores at chance level, never at 1.0. Without ties the values
are the usual ones. The same rule holds for R@K, P@1, mAP, MAP@R and R-precision, and so for
everything built on this module (``vestis eval``, the trainer's choice of ``best.pt``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)

# Above this many positives in a block, sorting each similarity row once is cheaper than
# one comparison pass over the row per positive (measured on a 2-core CPU, 5k-10k gallery).
_SORT_ABOVE_POSITIVES = 48


@dataclass
class RetrievalResult:
    """Metrics of one retrieval run, plus per-query details for reports and intervals.

    All per-query arrays are aligned with ``query_indices``: row ``i`` describes the original
    query ``query_indices[i]``. Queries without any positive in the gallery are not evaluated.
    Ranks and per-query values are expectations over random orders of tied scores (see the
    module docstring), so ``first_positive_rank`` can be fractional.
    """

    metrics: dict[str, float]
    first_positive_rank: np.ndarray
    query_indices: np.ndarray
    top_indices: np.ndarray
    average_precision: np.ndarray
    n_positives: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    map_at_r: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r_precision: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # The first positive's score group: its best possible rank, and the negatives and
    # positives that share its score (0 tied negatives: no tie that matters).
    first_best_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    first_tied_negatives: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    first_tied_positives: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: 95 % bootstrap intervals of the headline metrics, when computed (``vestis eval``).
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def hit_probability(self, k: int) -> np.ndarray:
        """Per query, the probability that a positive is among the top ``k``."""
        return _hit_probability(k, self.first_best_rank, self.first_tied_negatives,
                                self.first_tied_positives)

    def recall_curve(self, max_k: int = 50) -> np.ndarray:
        """Recall@K (hit rate) for K = 1..max_k; entry ``k - 1`` is R@k."""
        if max_k < 1:
            raise ValueError(f"max_k must be at least 1, got {max_k}")
        if len(self.first_positive_rank) == 0:
            return np.zeros(max_k)
        return np.array([self.hit_probability(k).mean() for k in range(1, max_k + 1)])

    def per_query(self, ks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """The headline metrics' per-query values; each metric is their mean."""
        ks = [int(name[2:]) for name in self.metrics if name.startswith("R@")] if ks is None \
            else list(ks)
        values = {f"R@{k}": self.hit_probability(k) for k in ks}
        values["P@1"] = self.hit_probability(1)
        values["mAP"] = self.average_precision
        values["MAP@R"] = self.map_at_r
        values["R-precision"] = self.r_precision
        return values


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Sequence[Hashable],
    gallery_emb: np.ndarray,
    gallery_labels: Sequence[Hashable],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    query_gallery_index: np.ndarray | None = None,
    block_size: int = 1024,
    top_n: int = 10,
) -> RetrievalResult:
    """Recall@K (hit rate), P@1, mAP, MAP@R and R-precision of ranking the gallery for every
    query, with ties counted at their expected value (module docstring).

    Args:
        query_emb: ``(n_queries, dim)`` embeddings, compared by dot product.
        query_labels: one hashable label per query; a gallery item is a positive when its
            label is equal.
        gallery_emb: ``(n_gallery, dim)`` embeddings.
        gallery_labels: one label per gallery item.
        ks: the K values of Recall@K.
        query_gallery_index: leave-one-out mapping; ``query_gallery_index[i] = j`` means that
            query ``i`` is gallery item ``j``, which is then left out of its ranking. ``-1``
            means that the query is not in the gallery.
        block_size: queries per similarity block (memory is about
            ``block_size * n_gallery * 4`` bytes per block).
        top_n: how many top gallery indices to keep per query in ``top_indices``.

    Queries left with no positive are skipped and counted in ``n_queries_skipped``;
    ``n_queries`` counts the evaluated ones.
    """
    queries, gallery = _validate_embeddings(query_emb, gallery_emb)
    ks = _validate_ks(ks)
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if top_n < 0:
        raise ValueError(f"top_n must be non-negative, got {top_n}")
    query_codes, gallery_codes = _encode_labels(query_labels, gallery_labels, queries, gallery)
    self_index = _validate_self_index(query_gallery_index, len(queries), len(gallery))

    positives = _PositiveIndex(gallery_codes)
    n_positives = positives.counts_for(query_codes) - _self_is_positive(
        self_index, query_codes, gallery_codes
    )
    evaluated = np.flatnonzero(n_positives > 0)
    if len(evaluated) == 0:
        raise ValueError("no query has a positive in the gallery: nothing to evaluate")

    has_self = bool((self_index >= 0).any())
    top_n = min(top_n, len(gallery) - int(has_self))
    # Blocks of queries with similar positive counts waste less work on padding.
    by_count = np.argsort(n_positives[evaluated], kind="stable")
    blocks = [
        _score_block(queries[rows], query_codes[rows], self_index[rows], gallery, positives, top_n)
        for rows in np.array_split(evaluated[by_count], -(-len(evaluated) // block_size))
    ]
    columns = [_unpermute(np.concatenate(parts), by_count) for parts in zip(*blocks, strict=True)]
    expected_rank, best_rank, tied_negatives, tied_positives, ap, map_at_r, r_precision, top = \
        columns
    result = RetrievalResult(
        metrics={},
        first_positive_rank=expected_rank,
        query_indices=evaluated,
        top_indices=top,
        average_precision=ap,
        n_positives=n_positives[evaluated],
        map_at_r=map_at_r,
        r_precision=r_precision,
        first_best_rank=best_rank,
        first_tied_negatives=tied_negatives,
        first_tied_positives=tied_positives,
    )
    result.metrics = _summarise(result, ks, len(queries), len(gallery))
    return result


def _unpermute(values: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    restored = np.empty_like(values)
    restored[permutation] = values
    return restored


def _validate_embeddings(query_emb, gallery_emb) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, emb in (("query_emb", query_emb), ("gallery_emb", gallery_emb)):
        emb = np.asarray(emb)
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, dim), got shape {emb.shape}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if not np.issubdtype(emb.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {emb.dtype}")
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if not np.isfinite(emb).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        arrays.append(emb)
    queries, gallery = arrays
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_emb has dim {queries.shape[1]} but gallery_emb has dim {gallery.shape[1]}"
        )
    return queries, gallery


def _validate_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    if any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"every K must be an integer of at least 1, got {ks}")
    return list(dict.fromkeys(int(k) for k in ks))


def _encode_labels(query_labels, gallery_labels, queries, gallery) -> tuple[np.ndarray, ...]:
    """Map labels to integer codes; query labels absent from the gallery get -1."""
    for name, labels, emb in (
        ("query", query_labels, queries),
        ("gallery", gallery_labels, gallery),
    ):
        if len(labels) != len(emb):
            raise ValueError(f"{len(labels)} {name} labels for {len(emb)} {name} embeddings")
    try:
        codes = {label: code for code, label in enumerate(dict.fromkeys(gallery_labels))}
        gallery_codes = np.fromiter((codes[label] for label in gallery_labels), np.int64)
        query_codes = np.fromiter((codes.get(label, -1) for label in query_labels), np.int64)
    except TypeError as exc:
        raise ValueError(f"labels must be hashable: {exc}") from exc
    return query_codes, gallery_codes


def _validate_self_index(index, n_queries: int, n_gallery: int) -> np.ndarray:
    if index is None:
        return np.full(n_queries, -1, dtype=np.int64)
    index = np.asarray(index)
    if index.shape != (n_queries,):
        raise ValueError(f"query_gallery_index must have shape ({n_queries},), got {index.shape}")
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"query_gallery_index must hold integers, got dtype {index.dtype}")
    if len(index) and (index.min() < -1 or index.max() >= n_gallery):
        raise ValueError(f"query_gallery_index values must be -1 or in [0, {n_gallery})")
    return index.astype(np.int64)


def _self_is_positive(self_index, query_codes, gallery_codes) -> np.ndarray:
    in_gallery = self_index >= 0
    same = np.zeros(len(self_index), dtype=np.int64)
    same[in_gallery] = gallery_codes[self_index[in_gallery]] == query_codes[in_gallery]
    return same


class _PositiveIndex:
    """Gallery indices grouped by label code, to list a query's positives without a scan."""

    def __init__(self, gallery_codes: np.ndarray):
        self.order = np.argsort(gallery_codes, kind="stable")
        self.counts = np.bincount(gallery_codes)
        self.starts = np.cumsum(self.counts) - self.counts

    def counts_for(self, codes: np.ndarray) -> np.ndarray:
        return np.where(codes >= 0, self.counts[np.maximum(codes, 0)], 0)

    def padded(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, valid)`` of shape ``(len(codes), max count)``.

        Padding repeats the query's last positive, so that every entry is a real positive of
        that query and can safely be masked out of the negatives.
        """
        counts = self.counts[codes]
        slots = np.arange(counts.max())[None, :]
        valid = slots < counts[:, None]
        offsets = np.minimum(slots, counts[:, None] - 1)
        return self.order[self.starts[codes][:, None] + offsets], valid


def _score_block(queries, codes, self_index, gallery, positives: _PositiveIndex, top_n: int):
    """Per-query rank figures (see :func:`_rank_metrics`) and top gallery indices."""
    sims = queries @ gallery.T
    rows = np.arange(len(queries))
    has_self = self_index >= 0
    sims[rows[has_self], self_index[has_self]] = -np.inf
    top = _top_indices(sims, top_n)

    pos_index, valid = positives.padded(codes)
    valid &= pos_index != self_index[:, None]
    pos_scores = np.where(valid, np.take_along_axis(sims, pos_index, axis=1), -np.inf)
    # Descending order; the -inf padding lands after the real positives.
    pos_scores = -np.sort(-pos_scores, axis=1)
    sims[rows[:, None], pos_index] = -np.inf  # only negatives remain finite

    n_positives = valid.sum(axis=1)
    real = np.arange(pos_scores.shape[1])[None, :] < n_positives[:, None]  # sorted columns
    above, tied = _count_above(sims, pos_scores)
    tied = np.where(real, tied, 0)
    figures = _rank_metrics(above, n_positives)
    for row in np.flatnonzero(tied.any(axis=1)):
        count = n_positives[row]
        tied_figures = _tied_rank_metrics(pos_scores[row, :count], above[row, :count],
                                          tied[row, :count])
        for column, value in zip(figures, tied_figures, strict=True):
            column[row] = value
    return (*figures, top)


def _top_indices(sims: np.ndarray, top_n: int) -> np.ndarray:
    if top_n == 0:
        return np.zeros((len(sims), 0), dtype=np.int64)
    return torch.topk(torch.from_numpy(sims), top_n, dim=1).indices.numpy()


def _count_above(sims: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(greater, tied)``: per ``[i, j]``, how many entries of ``sims[i]`` are above
    ``thresholds[i, j]``, and how many equal it."""
    if thresholds.shape[1] <= _SORT_ABOVE_POSITIVES:
        greater = np.stack([np.count_nonzero(sims > thresholds[:, j:j + 1], axis=1)
                            for j in range(thresholds.shape[1])], axis=1)
        tied = np.stack([np.count_nonzero(sims == thresholds[:, j:j + 1], axis=1)
                         for j in range(thresholds.shape[1])], axis=1)
        return greater, tied
    ascending = torch.from_numpy(np.sort(sims, axis=1))
    edges = torch.from_numpy(thresholds)
    below = torch.searchsorted(ascending, edges).numpy()
    not_above = torch.searchsorted(ascending, edges, right=True).numpy()
    return sims.shape[1] - not_above, not_above - below


def _rank_metrics(negatives_above: np.ndarray, n_positives: np.ndarray) -> list[np.ndarray]:
    """Per query, without ties: expected first-positive rank, its best rank, the negatives
    and positives tied with it, AP, MAP@R and R-precision."""
    position = np.arange(1, negatives_above.shape[1] + 1, dtype=np.float64)[None, :]
    valid = position <= n_positives[:, None]
    rank = position + negatives_above
    precision = np.where(valid, position / rank, 0.0)
    in_first_r = valid & (rank <= n_positives[:, None])
    ap = precision.sum(axis=1) / n_positives
    map_at_r = np.where(in_first_r, precision, 0.0).sum(axis=1) / n_positives
    r_precision = in_first_r.sum(axis=1) / n_positives
    first = rank[:, 0].astype(np.int64)
    return [first.astype(np.float64), first, np.zeros_like(first), np.ones_like(first),
            ap, map_at_r, r_precision]


def _tied_rank_metrics(scores: np.ndarray, above: np.ndarray, tied: np.ndarray) -> list:
    """One query's figures (as :func:`_rank_metrics`) in expectation over random orders of
    tied items. ``scores``: its positives' scores, descending; ``above`` / ``tied``: the
    negatives scoring more than / as much as each.

    Positives of equal score form a group: ``p`` positives and ``n`` tied negatives at ranks
    ``c + 1 .. c + m`` (``m = p + n``, ``c`` the items above). In a random order, position
    ``x`` of the group holds a positive with probability ``p / m``, and then the expected
    number of the group's positives up to it is ``1 + (x - 1)(p - 1)/(m - 1)``; summing
    ``E[positives so far] / rank`` over positions gives the exact expected AP.
    """
    n_positives = len(scores)
    ap = map_at_r = hits_in_r = 0.0
    first = None
    start = 0
    while start < n_positives:
        stop = start + int(np.count_nonzero(scores[start:] == scores[start]))
        p, n = stop - start, int(tied[start])
        c, m = start + int(above[start]), stop - start + int(tied[start])
        if first is None:
            first = (c + (m + 1) / (p + 1), c + 1, n, p)
        x = np.arange(1, m + 1, dtype=np.float64)
        so_far = start + 1 + ((x - 1) * (p - 1) / (m - 1) if m > 1 else 0.0)
        precision = (p / m) * so_far / (c + x)
        ap += precision.sum()
        map_at_r += precision[c + x <= n_positives].sum()
        hits_in_r += min(max(n_positives - c, 0), m) * p / m
        start = stop
    return [*first, ap / n_positives, map_at_r / n_positives, hits_in_r / n_positives]


def _hit_probability(k: int, best_rank: np.ndarray, tied_negatives: np.ndarray,
                     tied_positives: np.ndarray) -> np.ndarray:
    """P(a positive is in the top ``k``): the first positive's group starts at ``best_rank``;
    it misses when the group's first ``t = k - best_rank + 1`` places all hold tied negatives,
    with probability ``C(n, t) / C(n + p, t)``."""
    t = k - best_rank + 1
    n, m = tied_negatives, tied_negatives + tied_positives
    possible = (t >= 1) & (t <= n)
    safe_t = np.where(possible, t, 0).astype(np.float64)
    log_miss = (_log_factorial(n) - _log_factorial(np.maximum(n - safe_t, 0))
                - _log_factorial(m) + _log_factorial(m - safe_t))
    miss = np.where(possible, np.exp(log_miss), np.where(t < 1, 1.0, 0.0))
    return 1.0 - miss


def _log_factorial(values) -> np.ndarray:
    return torch.lgamma(torch.as_tensor(values, dtype=torch.float64) + 1).numpy()


def _summarise(result: RetrievalResult, ks, n_queries: int, n_gallery: int) -> dict:
    metrics = {name: float(values.mean()) for name, values in result.per_query(ks).items()}
    metrics["n_queries"] = len(result.query_indices)
    metrics["n_gallery"] = n_gallery
    metrics["n_queries_skipped"] = n_queries - len(result.query_indices)
    # Queries whose first correct image shares its score with a wrong one: where the tie
    # rule changes a figure (duplicate photos, collapsed or heavily quantised vectors).
    metrics["n_queries_tied"] = int(np.count_nonzero(result.first_tied_negatives))
    return metrics

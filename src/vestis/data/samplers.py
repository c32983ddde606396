"""P×K batch sampling with optional hard-negative neighbours.

Every batch holds P labels with K images each, the shape that metric-learning losses
(triplet with batch-hard mining, multi-similarity, ...) expect. With
``hard_negative_fraction > 0`` part of the labels are picked as neighbours of labels
already in the batch, so that look-alike instances meet as negatives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

NeighbourFn = Callable[[int], Sequence[int]]


class PKSampler(Sampler[list[int]]):
    """A batch sampler: use it as ``DataLoader(dataset, batch_sampler=PKSampler(...))``.

    ``labels``, ``groups`` and ``categories`` are per-sample integer codes (as in
    :class:`vestis.data.ImageDataset`; -1 means none). Labels with fewer than
    ``min_per_label`` images are never sampled; labels with fewer than ``k`` images repeat
    some of them.

    Of the P labels of a batch, ``round(hard_negative_fraction * p)`` (at most P - 1) are
    neighbours of a label already in the batch, the rest are drawn from a shuffled epoch
    order. Neighbours come from ``neighbours(label)`` (closest first; e.g. HTL
    anchor-neighbour sampling) or, by default, other labels of the same group first, then
    of the same category. The batches depend only on ``seed`` and the epoch set with
    :meth:`set_epoch`. One epoch has ``batches_per_epoch`` batches, by default
    ``number of labels // p``. ``label_weights`` (one per label code) makes the drawn labels
    follow those odds instead of a uniform shuffle, e.g. to give each training source an
    equal share of the batches however many labels it has (:func:`source_balanced_weights`).
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        *,
        groups: Sequence[int] | None = None,
        categories: Sequence[int] | None = None,
        hard_negative_fraction: float = 0.0,
        neighbours: NeighbourFn | None = None,
        min_per_label: int = 2,
        batches_per_epoch: int | None = None,
        label_weights: Sequence[float] | None = None,
        seed: int = 0,
    ):
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be at least 1, got p={p}, k={k}")
        if not 0.0 <= hard_negative_fraction <= 1.0:
            raise ValueError(
                f"hard_negative_fraction must be in [0, 1], got {hard_negative_fraction}"
            )
        if min_per_label < 1:
            raise ValueError(f"min_per_label must be at least 1, got {min_per_label}")
        labels = np.asarray(labels, dtype=np.int64)
        for name, values in (("groups", groups), ("categories", categories)):
            if values is not None and len(values) != len(labels):
                raise ValueError(f"{name} has {len(values)} entries, labels {len(labels)}")
        self.p, self.k = p, k
        self.hard_negative_fraction = hard_negative_fraction
        self.seed = seed
        self.epoch = 0
        self.indices_by_label = _indices_by_label(labels, min_per_label)
        self.eligible = np.asarray(sorted(self.indices_by_label), dtype=np.int64)
        if len(self.eligible) < p:
            raise ValueError(
                f"only {len(self.eligible)} labels have at least {min_per_label} images; "
                f"a batch needs p={p}"
            )
        self.batches_per_epoch = batches_per_epoch or max(1, len(self.eligible) // p)
        self._custom_neighbours = neighbours
        self._tiers = _default_tiers(labels, groups, categories, self.indices_by_label)
        self.odds = _label_odds(label_weights, self.eligible)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = _EpochOrder(self.eligible, rng, self.odds)
        n_hard = min(round(self.hard_negative_fraction * self.p), self.p - 1)
        for _ in range(self.batches_per_epoch):
            chosen = self._batch_labels(order, n_hard, rng)
            yield [index for label in chosen for index in self._images_of(label, rng)]

    def _batch_labels(self, order: _EpochOrder, n_hard: int, rng) -> list[int]:
        chosen = [order.next(exclude=set())]
        taken = set(chosen)
        while len(chosen) < self.p:
            hard_left = n_hard - (len(chosen) - 1) > 0
            label = self._neighbour(chosen, taken, rng) if hard_left else None
            if label is None:
                label = order.next(exclude=taken)
            chosen.append(label)
            taken.add(label)
        return chosen

    def _neighbour(self, chosen: list[int], taken: set[int], rng) -> int | None:
        """The closest free neighbour of any label in the batch (ties: random anchor)."""
        best: tuple[int, int] | None = None
        for position in rng.permutation(len(chosen)):
            found = self._first_free_neighbour(chosen[position], taken, rng)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
                if best[0] == 0:
                    break
        return None if best is None else best[1]

    def _first_free_neighbour(self, anchor: int, taken: set[int], rng) -> tuple[int, int] | None:
        """(rank, label): the rank is the list position, or the tier for default neighbours."""
        if self._custom_neighbours is not None:
            for rank, label in enumerate(self._custom_neighbours(anchor)):
                if label not in taken and label in self.indices_by_label:
                    return rank, int(label)
            return None
        for tier, members in enumerate(self._tiers(anchor)):
            label = _random_free(members, taken, rng)
            if label is not None:
                return tier, label
        return None

    def _images_of(self, label: int, rng) -> list[int]:
        indices = self.indices_by_label[label]
        if len(indices) >= self.k:
            return [int(i) for i in rng.choice(indices, self.k, replace=False)]
        # Every image once, then repeats: as much variety as the label has.
        extra = rng.choice(indices, self.k - len(indices), replace=True)
        return [int(i) for i in rng.permutation(np.concatenate([indices, extra]))]


class _EpochOrder:
    """Eligible labels in a shuffled order, reshuffled whenever it runs out; with ``odds``,
    a weighted draw (with replacement) of as many labels instead of a shuffle."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator,
                 odds: np.ndarray | None = None):
        self.labels, self.rng, self.odds = labels, rng, odds
        self.queue: list[int] = []

    def _refill(self) -> list[int]:
        if self.odds is None:
            return [int(x) for x in self.rng.permutation(self.labels)]
        drawn = self.rng.choice(self.labels, size=len(self.labels), replace=True, p=self.odds)
        return [int(x) for x in drawn]

    def next(self, exclude: set[int]) -> int:
        for _ in range(2):
            while self.queue:
                label = self.queue.pop()
                if label not in exclude:
                    return label
            self.queue = self._refill()
        free = [int(x) for x in self.labels if int(x) not in exclude]
        return free[int(self.rng.integers(len(free)))]


def source_balanced_weights(label_sources: Sequence[str]) -> list[float]:
    """Per-label weights that give every source the same total: 1 / (labels of its source)."""
    counts: dict[str, int] = {}
    for source in label_sources:
        counts[source] = counts.get(source, 0) + 1
    return [1.0 / counts[source] for source in label_sources]


def _label_odds(weights: Sequence[float] | None, eligible: np.ndarray) -> np.ndarray | None:
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) <= int(eligible.max()) or (weights < 0).any():
        raise ValueError("label_weights needs one non-negative weight per label code")
    odds = weights[eligible]
    if odds.sum() <= 0:
        raise ValueError("label_weights gives every eligible label a weight of 0")
    return odds / odds.sum()


def _indices_by_label(labels: np.ndarray, min_per_label: int) -> dict[int, np.ndarray]:
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        by_label.setdefault(label, []).append(index)
    return {
        label: np.asarray(indices, dtype=np.int64)
        for label, indices in by_label.items()
        if len(indices) >= min_per_label and label >= 0
    }


def _default_tiers(labels, groups, categories, indices_by_label) -> Callable[[int], list]:
    """For a label: [eligible labels of its group, eligible labels of its category]."""
    first_index = {label: int(indices[0]) for label, indices in indices_by_label.items()}
    members: list[dict[int, list[int]]] = []
    keys: list[dict[int, int]] = []
    for values in (groups, categories):
        if values is None:
            continue
        key_of = {label: int(values[index]) for label, index in first_index.items()}
        by_key: dict[int, list[int]] = {}
        for label, key in key_of.items():
            if key >= 0:
                by_key.setdefault(key, []).append(label)
        members.append(by_key)
        keys.append(key_of)

    def tiers(label: int) -> list[list[int]]:
        if label not in first_index:
            return []
        return [by_key.get(key_of[label], []) for by_key, key_of in zip(members, keys, strict=True)]

    return tiers


def _random_free(members: list[int], taken: set[int], rng, tries: int = 8) -> int | None:
    """A random member not in ``taken``; a few cheap draws before a full scan."""
    if not members:
        return None
    for _ in range(tries):
        label = members[int(rng.integers(len(members)))]
        if label not in taken:
            return label
    free = [label for label in members if label not in taken]
    return free[int(rng.integers(len(free)))] if free else None

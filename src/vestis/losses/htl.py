"""HTL: hierarchical triplet loss with anchor-neighbour sampling and a dynamic violate margin.

Ge, Huang, Dong, Scott, "Deep Metric Learning with Hierarchical Triplet Loss", ECCV 2018.

Random P×K batches rarely hold look-alike classes, so most triplets are easy and the model
never sees the global shape of the data. HTL adds a class tree built from the whole training
set, and uses it twice:

1. **Hierarchical class tree** (:class:`ClassTree`). All training images are embedded
   (L2-normalised, so squared Euclidean distances lie in ``[0, 4]``). The distance of two
   classes is the average squared distance of their samples,
   ``d(p, q) = mean_{i∈p, j∈q} ||r_i - r_j||² = 2 - 2 μ_p·μ_q`` (``μ`` a class's mean of
   normalised embeddings). ``d_0`` is the average within-class distance, the mean over
   classes of ``s_c = mean_{i≠j∈c} ||r_i - r_j||²``. The tree has levels ``0..L`` with merge
   thresholds ``d_l = d_0 + l (4 - d_0) / L``; at level ``l`` nodes whose average-linkage
   distance is below ``d_l`` are merged, closest pairs first (leaves are the classes; level
   0 merges the classes closer than ``d_0``, level ``L`` is the root). Average linkage has
   no inversions, so this is the average-linkage (UPGMA) dendrogram of the class distances,
   cut at each ``d_l``: two classes first share a node at the lowest level ``H`` whose
   threshold exceeds their cophenetic distance.
2. **Anchor-neighbour sampling**: a batch holds ``l'`` random anchor classes and, for
   each, its ``m - 1`` nearest classes in the tree, so that look-alike classes meet as
   negatives. :func:`anchor_neighbour_classes` does it standalone;
   :meth:`HierarchicalTripletLoss.neighbours` plugs it into
   :class:`vestis.data.samplers.PKSampler` (``neighbours=loss.neighbours``,
   ``hard_negative_fraction`` ≈ ``(m - 1) / m``).
3. **Dynamic violate margin**: for a triplet (a, p, n),
   ``L = [||x_a - x_p||² - ||x_a - x_n||² + α]_+`` with
   ``α = β + d_{H(y_a, y_n)} - s_{y_a}``: negatives from classes that merge late in the tree
   (far apart globally) get a larger margin, negatives from look-alike classes a smaller
   one; a loose anchor class (large ``s``) gets a smaller margin.

The first ``warmup_epochs`` epochs have no tree: the loss is a standard triplet loss with
the fixed margin ``warmup_margin`` (same squared distances, mining and averaging), as the
paper trains the model that builds the first tree. From then on the tree is rebuilt every
``rebuild_every`` epochs, in :meth:`HierarchicalTripletLoss.on_epoch_start`.

Choices made here:

- distances are **squared** Euclidean on normalised embeddings, ``d_max = 4``; so
  ``warmup_margin`` is on the squared scale (0.2 here ≈ 0.1 of the cosine margin of
  :class:`vestis.losses.TripletLoss`, as ``||a - b||² = 2 - 2 cos(a, b)``);
- ``s_c`` is the paper's mean pairwise squared distance within the class, computed exactly
  from the class mean as ``2 n / (n - 1) · (1 - ||μ_c||²)`` (twice the mean squared distance
  to the centre, up to ``n / (n - 1)``), the same scale as ``d_0`` and ``d_l``; classes with
  one image get ``s_c = d_0``;
- nodes are merged by average linkage over classes (each class weighs 1);
- the loss is averaged over all mined triplets (the paper's ``1/Z``, without its constant
  ``1/2``); ``reduction="nonzero"`` averages over the violating ones instead;
- mining (``all`` is the paper; ``semi-hard``, ``hard``, ``batch-hard`` optional) uses the
  dynamic margins: semi-hard means ``d_ap < d_an < d_ap + α``.

Parts: ``htl`` (the loss), ``mean_margin`` (mean α of the mined triplets) and
``active_triplets`` (how many of them violate their margin).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from vestis.losses.base import EpochContext, LossOutput, MethodLoss, TrainBatch
from vestis.losses.registry import register_loss

D_MAX = 4.0  # the largest squared distance between two unit vectors
HTL_MINING = ("all", "semi-hard", "hard", "batch-hard")
REDUCTIONS = ("mean", "nonzero")


class ClassTree:
    """The hierarchical class tree of HTL, built by :meth:`from_embeddings`.

    Class codes run over ``0..num_classes-1``; classes without images are leaves of their own
    that join the others only at the root (level ``levels``) and have no neighbours.
    """

    def __init__(
        self,
        centres: np.ndarray,
        within: np.ndarray,
        present: np.ndarray,
        level_labels: np.ndarray,
        thresholds: np.ndarray,
    ):
        self.centres = centres  # (C, D) mean of normalised embeddings; 0 where absent
        self.within = within  # (C,) s_c
        self.present = present  # (C,) bool
        self.level_labels = level_labels  # (L + 1, C) node id of each class at each level
        self.thresholds = thresholds  # (L + 1,) d_0 .. d_L

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        labels: np.ndarray,
        levels: int = 16,
        num_classes: int | None = None,
    ) -> ClassTree:
        """Build the tree from (N, D) embeddings and their (N,) class codes (-1: none)."""
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        embeddings, labels = _known(embeddings, labels)
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if labels.size and labels.max() >= num_classes:
            raise ValueError(f"label {labels.max()} out of range for {num_classes} classes")
        centres, counts = _class_means(embeddings, labels, num_classes)
        within, d0 = _within_class_distances(centres, counts)
        thresholds = d0 + np.arange(levels + 1) * (D_MAX - d0) / levels
        present = counts > 0
        level_labels = _level_labels(centres, present, thresholds)
        return cls(centres, within, present, level_labels, thresholds)

    @property
    def num_classes(self) -> int:
        return len(self.within)

    @property
    def levels(self) -> int:
        return len(self.thresholds) - 1

    @property
    def d0(self) -> float:
        return float(self.thresholds[0])

    def merge_levels(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise :meth:`merge_level` of two arrays of class codes."""
        same = self.level_labels[:, np.asarray(a)] == self.level_labels[:, np.asarray(b)]
        return same.argmax(axis=0)

    def merge_level(self, a: int, b: int) -> int:
        """The lowest level at which classes ``a`` and ``b`` share a node (0 when a == b)."""
        return int(self.merge_levels(np.asarray([a]), np.asarray([b]))[0])

    def merge_threshold(self, a: int, b: int) -> float:
        """``d_H(a, b)``: the merge threshold of the level where ``a`` and ``b`` meet."""
        return float(self.thresholds[self.merge_level(a, b)])

    def within_class_distance(self, c: int) -> float:
        """``s_c``: the mean squared distance between two images of class ``c``."""
        return float(self.within[c])

    def neighbours(self, c: int, limit: int | None = None) -> list[int]:
        """Other present classes, closest in the tree first: by merge level, then distance."""
        if not 0 <= c < self.num_classes or not self.present[c]:
            return []
        levels = self.merge_levels(np.full(self.num_classes, c), np.arange(self.num_classes))
        distances = np.clip(2.0 - 2.0 * self.centres @ self.centres[c], 0.0, D_MAX)
        key = levels * (D_MAX + 1.0) + distances
        key[c] = np.inf
        key[~self.present] = np.inf
        count = int(self.present.sum()) - 1
        if limit is not None:
            count = min(count, limit)
        return [int(x) for x in _smallest(key, count)]

    def margins(self, anchors: np.ndarray, negatives: np.ndarray, beta: float) -> np.ndarray:
        """HTL's ``α = β + d_H(y_a, y_n) - s_{y_a}`` for each (anchor, negative) class pair."""
        levels = self.merge_levels(anchors, negatives)
        return beta + self.thresholds[levels] - self.within[np.asarray(anchors)]


def _known(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a label, re-normalised (the formulas below need unit vectors)."""
    labels = np.asarray(labels, dtype=np.int64)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    keep = labels >= 0
    embeddings = embeddings[keep]
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12), labels[keep]


def _class_means(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) mean embedding of each class (0 where it has no image) and (C,) counts."""
    counts = np.bincount(labels, minlength=num_classes)
    ones = np.ones(len(labels))
    member = sparse.csr_matrix((ones, (labels, np.arange(len(labels)))),
                               shape=(num_classes, len(labels)))
    sums = np.asarray(member @ embeddings)
    return sums / np.maximum(counts, 1)[:, None], counts


def _within_class_distances(centres: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """``s_c = mean_{i≠j} ||r_i - r_j||² = 2n/(n-1) (1 - ||μ||²)`` and d_0, their mean."""
    spread = np.clip(1.0 - np.einsum("cd,cd->c", centres, centres), 0.0, None)
    pairs = counts >= 2
    within = np.zeros(len(counts))
    n = counts[pairs]
    within[pairs] = 2.0 * n / (n - 1) * spread[pairs]
    d0 = float(within[pairs].mean()) if pairs.any() else 0.0
    within[~pairs] = d0
    return within, d0


def _level_labels(centres: np.ndarray, present: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(L + 1, C) node ids: average-linkage dendrogram cut below each threshold."""
    num_classes, levels = len(present), len(thresholds) - 1
    # Absent classes are singletons below the root: ids no present class uses.
    level_labels = np.tile(np.arange(num_classes) + num_classes, (levels + 1, 1))
    level_labels[levels] = 0
    codes = np.flatnonzero(present)
    if len(codes) < 2:
        level_labels[:levels, codes] = 0
        return level_labels
    merges = linkage(_condensed_distances(centres[codes]), method="average")
    for level in range(levels):
        below = np.nextafter(thresholds[level], -np.inf)  # "below", not "at most"
        level_labels[level, codes] = fcluster(merges, t=below, criterion="distance")
    return level_labels


def _condensed_distances(centres: np.ndarray) -> np.ndarray:
    """Condensed ``2 - 2 μ_p·μ_q``: the average squared distance of two classes' images."""
    centres = centres.astype(np.float32)
    distances = np.clip(2.0 - 2.0 * centres @ centres.T, 0.0, D_MAX)
    np.fill_diagonal(distances, 0.0)
    return squareform(distances, checks=False).astype(np.float64)


def _smallest(key: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest keys, in increasing order."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if count < len(key):
        part = np.argpartition(key, count - 1)[:count]
        return part[np.argsort(key[part], kind="stable")]
    return np.argsort(key, kind="stable")[:count]


def anchor_neighbour_classes(
    tree: ClassTree, n_anchors: int, n_neighbours: int, rng: np.random.Generator
) -> list[int]:
    """The paper's anchor-neighbour sampling of the classes of one batch.

    ``n_anchors`` (the paper's ``l'``) random present classes, each followed by its
    ``n_neighbours`` (``m - 1``) nearest classes in the tree; a class already chosen is not
    repeated, so a batch holds at most ``l' · m`` classes.
    """
    candidates = np.flatnonzero(tree.present)
    if n_anchors > len(candidates):
        raise ValueError(f"{n_anchors} anchors asked, only {len(candidates)} classes")
    chosen: dict[int, None] = {}
    for anchor in rng.choice(candidates, n_anchors, replace=False):
        for label in [int(anchor), *tree.neighbours(int(anchor), limit=n_neighbours)]:
            chosen.setdefault(label, None)
    return list(chosen)


@register_loss("htl")
class HierarchicalTripletLoss(MethodLoss):
    """HTL as a method loss: see the module docstring.

    Parameters: ``levels`` (L, tree levels), ``beta`` (β of the margin), ``warmup_epochs``
    (epochs trained with the plain triplet loss before the first tree), ``rebuild_every``
    (epochs between tree rebuilds), ``warmup_margin`` (fixed margin before the tree, on
    squared distances), ``mining`` (one of ``HTL_MINING``), ``reduction`` (``mean`` over all
    mined triplets or over the ``nonzero`` ones), ``max_neighbours`` (length of the list
    :meth:`neighbours` returns).
    """

    def __init__(
        self,
        levels: int = 16,
        beta: float = 0.1,
        warmup_epochs: int = 1,
        rebuild_every: int = 1,
        warmup_margin: float = 0.2,
        mining: str = "all",
        reduction: str = "mean",
        max_neighbours: int = 32,
        **_dims,
    ):
        super().__init__()
        _check_choice("mining", mining, HTL_MINING)
        _check_choice("reduction", reduction, REDUCTIONS)
        if levels < 1 or rebuild_every < 1 or warmup_epochs < 0 or max_neighbours < 1:
            raise ValueError("levels, rebuild_every, max_neighbours >= 1; warmup_epochs >= 0")
        if warmup_margin <= 0:
            raise ValueError(f"warmup_margin must be positive, got {warmup_margin}")
        self.levels, self.beta = levels, beta
        self.warmup_epochs, self.rebuild_every = warmup_epochs, rebuild_every
        self.warmup_margin, self.mining, self.reduction = warmup_margin, mining, reduction
        self.max_neighbours = max_neighbours
        self.tree: ClassTree | None = None
        self._neighbour_cache: dict[int, list[int]] = {}

    # -- the tree ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, context: EpochContext) -> None:
        if self.should_rebuild(epoch):
            embeddings, labels = context.embed_train_set()
            self.set_tree(ClassTree.from_embeddings(
                embeddings, labels, levels=self.levels, num_classes=context.num_labels
            ))

    def should_rebuild(self, epoch: int) -> bool:
        """From ``warmup_epochs`` on, every ``rebuild_every`` epochs (or when there is none)."""
        if epoch < self.warmup_epochs:
            return False
        return self.tree is None or (epoch - self.warmup_epochs) % self.rebuild_every == 0

    def set_tree(self, tree: ClassTree | None) -> None:
        self.tree = tree
        self._neighbour_cache = {}

    def neighbours(self, label: int) -> Sequence[int]:
        """The classes closest to ``label`` in the tree (none before the first tree)."""
        if self.tree is None:
            return []
        label = int(label)
        if label not in self._neighbour_cache:
            self._neighbour_cache[label] = self.tree.neighbours(label, limit=self.max_neighbours)
        return self._neighbour_cache[label]

    # -- the loss ----------------------------------------------------------------------
    def forward(self, batch: TrainBatch) -> LossOutput:
        embeddings = F.normalize(batch.embeddings, dim=1)
        loss, margins, violations = self.triplet_terms(embeddings, batch.labels)
        active = int((violations > 0).sum())
        mean_margin = float(margins.mean()) if margins.numel() else 0.0
        parts = {"htl": float(loss.detach()), "mean_margin": mean_margin,
                 "active_triplets": float(active)}
        return LossOutput(loss, parts)

    def triplet_terms(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, margins, hinge terms) of the mined triplets of normalised embeddings."""
        distances = squared_distances(embeddings)
        margin_matrix = self.margin_matrix(labels).to(embeddings)
        anchors, positives, negatives = self.mine(distances, margin_matrix, labels)
        margins = margin_matrix[anchors, negatives]
        hinge = F.relu(
            distances[anchors, positives] - distances[anchors, negatives] + margins
        )
        return _reduce(hinge, self.reduction), margins.detach(), hinge.detach()

    def margin_matrix(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, B): the margin of anchor row i with negative column j (fixed before a tree)."""
        size = len(labels)
        if self.tree is None:
            return torch.full((size, size), self.warmup_margin)
        classes, inverse = np.unique(labels.detach().cpu().numpy(), return_inverse=True)
        rows, cols = np.meshgrid(classes, classes, indexing="ij")
        per_class = self.tree.margins(rows.ravel(), cols.ravel(), self.beta)
        per_class = torch.as_tensor(per_class.reshape(rows.shape), dtype=torch.float32)
        index = torch.as_tensor(inverse.reshape(-1))
        return per_class[index][:, index]

    def mine(self, distances: torch.Tensor, margins: torch.Tensor, labels: torch.Tensor):
        """Indices (anchors, positives, negatives) of the triplets the loss uses."""
        if self.mining == "batch-hard":
            return _batch_hard(distances.detach(), margins, labels)
        anchors, positives, negatives = lmu.get_all_triplets_indices(labels)
        if self.mining == "all":
            return anchors, positives, negatives
        d_ap = distances[anchors, positives].detach()
        d_an = distances[anchors, negatives].detach()
        if self.mining == "hard":
            keep = d_an < d_ap
        else:
            keep = (d_an > d_ap) & (d_an < d_ap + margins[anchors, negatives])
        return anchors[keep], positives[keep], negatives[keep]


def squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, B) ``||x_i - x_j||² = 2 - 2 x_i·x_j`` of unit rows (no square root: no NaN grads)."""
    return (2.0 - 2.0 * embeddings @ embeddings.T).clamp(0.0, D_MAX)


def _batch_hard(distances: torch.Tensor, margins: torch.Tensor, labels: torch.Tensor):
    """Per anchor, the triplet of largest hinge: farthest positive, most violating negative."""
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    has_both = positive.any(dim=1) & (~same).any(dim=1)
    anchors = torch.nonzero(has_both).flatten()
    far = distances.masked_fill(~positive, -torch.inf).argmax(dim=1)
    violation = (margins.to(distances) - distances).masked_fill(same, -torch.inf)
    return anchors, far[anchors], violation.argmax(dim=1)[anchors]


def _reduce(hinge: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "nonzero":
        hinge = hinge[hinge > 0]
    if hinge.numel() == 0:
        return hinge.sum()  # a zero that keeps the graph
    return hinge.mean()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; one of {', '.join(choices)}")

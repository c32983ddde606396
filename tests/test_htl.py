from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, reducers
from pytorch_metric_learning.distances import LpDistance

import vestis.losses.htl  # noqa: F401  (registers "htl")
from tests.smoke import CONFIGS
from vestis.data.samplers import PKSampler
from vestis.losses import EpochContext, TrainBatch, create_loss
from vestis.losses.htl import ClassTree, HierarchicalTripletLoss, anchor_neighbour_classes


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def five_classes() -> np.ndarray:
    """Centres: 0 and 1 nearly equal, 2 and 3 close, 4 opposite everyone."""
    e = np.eye(8)
    return np.stack([
        e[0], unit(e[0] + 0.15 * e[1]), e[2], unit(e[2] + 0.8 * e[3]), unit(-e[0] - e[2]),
    ])


def samples(centres: np.ndarray, per_class: int = 6, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per_class)
    points = centres[labels] + noise * rng.standard_normal((len(labels), centres.shape[1]))
    return points / np.linalg.norm(points, axis=1, keepdims=True), labels


def paired_centres(pairs: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Classes 2i and 2i+1 close to each other, pairs far apart."""
    rng = np.random.default_rng(seed)
    bases = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:pairs]
    twins = bases + 0.2 * rng.standard_normal(bases.shape)
    centres = np.stack([bases, twins], axis=1).reshape(2 * pairs, dim)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def naive_merge_levels(points, labels, thresholds) -> np.ndarray:
    """Level by level: merge the closest pair of nodes (average linkage) while below d_l."""
    classes = np.unique(labels)
    pair = np.array([[np.mean(((points[labels == p][:, None] - points[labels == q][None]) ** 2)
                               .sum(-1)) for q in classes] for p in classes])
    nodes = [[c] for c in classes]
    levels = np.full((len(classes), len(classes)), len(thresholds) - 1)
    for level, threshold in enumerate(thresholds[:-1]):
        while len(nodes) > 1:
            i, j = min(itertools.combinations(range(len(nodes)), 2),
                       key=lambda ij: pair[np.ix_(nodes[ij[0]], nodes[ij[1]])].mean())
            if pair[np.ix_(nodes[i], nodes[j])].mean() >= threshold:
                break
            for a, b in itertools.product(nodes[i], nodes[j]):
                levels[a, b] = levels[b, a] = level
            nodes[i] = nodes[i] + nodes.pop(j)
    np.fill_diagonal(levels, 0)
    return levels


# -- the tree ------------------------------------------------------------------------------
def test_the_two_closest_classes_merge_first_and_the_far_class_last():
    tree = ClassTree.from_embeddings(*samples(five_classes()), levels=16)
    level = {(a, b): tree.merge_level(a, b) for a, b in itertools.combinations(range(5), 2)}
    assert min(level, key=level.get) == (0, 1)
    assert all(level[0, 1] < value for pair, value in level.items() if pair != (0, 1))
    with_far = [value for pair, value in level.items() if 4 in pair]
    without = [value for pair, value in level.items() if 4 not in pair]
    assert min(with_far) > max(without)
    assert tree.merge_threshold(0, 4) == tree.thresholds[level[0, 4]] > tree.merge_threshold(0, 1)
    assert tree.neighbours(0)[0] == 1 and tree.neighbours(0)[-1] == 4
    assert tree.neighbours(2, limit=1) == [3]


def test_tree_levels_match_level_by_level_average_linkage_merging():
    rng = np.random.default_rng(3)
    points, labels = samples(rng.standard_normal((12, 6)), per_class=4, noise=0.4, seed=3)
    tree = ClassTree.from_embeddings(points, labels, levels=8)
    expected = naive_merge_levels(points, labels, tree.thresholds)
    got = tree.merge_levels(*np.meshgrid(np.arange(12), np.arange(12), indexing="ij"))
    assert np.array_equal(got, expected)
    assert 1 < len(np.unique(expected)) and tree.thresholds[-1] == 4.0


def test_thresholds_and_within_class_distances_follow_the_paper():
    points, labels = samples(five_classes(), per_class=5, noise=0.2, seed=1)
    tree = ClassTree.from_embeddings(points, labels, levels=4)
    within = []
    for c in range(5):
        own = points[labels == c]
        squared = ((own[:, None] - own[None]) ** 2).sum(-1)
        within.append(squared.sum() / (len(own) * (len(own) - 1)))
        assert tree.within_class_distance(c) == pytest.approx(within[c])
    d0 = np.mean(within)
    assert tree.thresholds == pytest.approx(d0 + np.arange(5) * (4 - d0) / 4)


def test_absent_classes_join_only_at_the_root_and_have_no_neighbours():
    points, labels = samples(five_classes())
    tree = ClassTree.from_embeddings(points, labels, levels=16, num_classes=7)
    assert tree.merge_level(5, 0) == tree.merge_level(5, 6) == 16
    assert tree.neighbours(5) == [] and 5 not in tree.neighbours(0)


def test_building_a_tree_of_thousands_of_classes_is_quick():
    import time

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2000), 3)
    points = rng.standard_normal((len(labels), 32))
    started = time.perf_counter()
    tree = ClassTree.from_embeddings(points / np.linalg.norm(points, axis=1)[:, None], labels)
    assert time.perf_counter() - started < 10
    assert len(tree.neighbours(7, limit=5)) == 5


# -- anchor-neighbour sampling -------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_anchor_neighbour_sets_hold_each_anchors_tree_neighbours(seed):
    tree = ClassTree.from_embeddings(*samples(paired_centres(8), per_class=3))
    rng = np.random.default_rng(seed)
    chosen = anchor_neighbour_classes(tree, n_anchors=3, n_neighbours=2, rng=rng)
    assert len(chosen) == len(set(chosen)) <= 9
    anchors = [c for c in chosen if set(tree.neighbours(c, limit=2)) <= set(chosen)]
    assert chosen[0] in anchors and len(anchors) >= 3
    single = anchor_neighbour_classes(tree, 1, 1, np.random.default_rng(seed))
    assert single[1] == single[0] ^ 1  # the twin class


# -- the margin and the loss ---------------------------------------------------------------
def test_classes_merging_late_get_a_larger_margin():
    tree = ClassTree.from_embeddings(*samples(five_classes()))
    loss = HierarchicalTripletLoss(beta=0.1)
    loss.set_tree(tree)
    labels = torch.tensor([0, 0, 1, 1, 4, 4])
    margins = loss.margin_matrix(labels)
    assert margins[0, 2] < margins[0, 4]
    expected = 0.1 + tree.merge_threshold(0, 4) - tree.within_class_distance(0)
    assert margins[1, 5].item() == pytest.approx(expected, rel=1e-5)


def random_batch(seed: int = 0, classes: int = 4, per_class: int = 3, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=generator)
    points = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=generator)
    return TrainBatch(points, points, labels, torch.full_like(labels, -1))


@pytest.mark.parametrize(("reduction", "reducer"), [
    ("mean", reducers.MeanReducer()), ("nonzero", reducers.AvgNonZeroReducer()),
])
def test_before_the_tree_the_loss_is_a_standard_triplet_loss(reduction, reducer):
    batch = random_batch()
    loss = HierarchicalTripletLoss(warmup_margin=0.3, reduction=reduction)
    standard = losses.TripletMarginLoss(
        margin=0.3, distance=LpDistance(power=2, normalize_embeddings=True), reducer=reducer
    )
    output = loss(batch)
    assert output.total.item() == pytest.approx(standard(batch.embeddings, batch.labels).item(),
                                                rel=1e-4)
    assert output.parts["mean_margin"] == pytest.approx(0.3)


def counting_context(points, labels, calls: list[int]) -> EpochContext:
    def embed():
        calls.append(1)
        return points, labels

    return EpochContext(int(labels.max()) + 1, 0, embed)


def test_the_tree_appears_after_warmup_and_is_rebuilt_on_schedule():
    points, labels = samples(five_classes())
    calls: list[int] = []
    context = counting_context(points, labels, calls)
    loss = create_loss({"name": "htl", "warmup_epochs": 1, "rebuild_every": 2},
                       num_labels=5, num_categories=0, feature_dim=8, embed_dim=8)
    loss.on_epoch_start(0, context)
    assert loss.tree is None and list(loss.neighbours(0)) == [] and calls == []
    loss.on_epoch_start(1, context)
    assert loss.tree is not None and list(loss.neighbours(0))[:1] == [1]
    for epoch in (2, 3, 4):
        loss.on_epoch_start(epoch, context)
    assert len(calls) == 2  # epochs 1 and 3
    batch = TrainBatch(torch.as_tensor(points, dtype=torch.float32), torch.zeros(1),
                       torch.as_tensor(labels), torch.full((len(labels),), -1))
    output = loss(batch)
    assert set(output.parts) == {"htl", "mean_margin", "active_triplets"}
    assert output.parts["mean_margin"] != pytest.approx(0.2)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="mining"):
        HierarchicalTripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="reduction"):
        HierarchicalTripletLoss(reduction="sum")
    with pytest.raises(ValueError, match="warmup_margin"):
        HierarchicalTripletLoss(warmup_margin=0)


@pytest.mark.parametrize("mining", ["semi-hard", "hard", "batch-hard"])
def test_mined_triplets_obey_their_definition(mining):
    batch = random_batch(seed=1)
    loss = HierarchicalTripletLoss(mining=mining, warmup_margin=0.5)
    embeddings = F.normalize(batch.embeddings, dim=1)
    distances = torch.cdist(embeddings, embeddings).pow(2)
    margins = loss.margin_matrix(batch.labels)
    anchors, positives, negatives = loss.mine(distances, margins, batch.labels)
    assert len(anchors) > 0
    d_ap, d_an = distances[anchors, positives], distances[anchors, negatives]
    assert torch.all(batch.labels[anchors] == batch.labels[positives])
    assert torch.all(batch.labels[anchors] != batch.labels[negatives])
    if mining == "semi-hard":
        assert torch.all((d_an > d_ap) & (d_an < d_ap + 0.5))
    elif mining == "hard":
        assert torch.all(d_an < d_ap)
    else:
        assert len(anchors) == len(batch.labels)
        hinge = d_ap - d_an + 0.5
        for a, value in zip(anchors.tolist(), hinge.tolist(), strict=True):
            worst = max(distances[a, p] - distances[a, n] + 0.5
                        for p in range(12) for n in range(12)
                        if p != a and batch.labels[p] == batch.labels[a] != batch.labels[n])
            assert value == pytest.approx(worst.item(), abs=1e-5)


# -- the sampler and training --------------------------------------------------------------
def test_pk_sampler_draws_tree_neighbours_together():
    points, labels = samples(paired_centres(6), per_class=4)
    loss = HierarchicalTripletLoss()
    sampler = PKSampler(labels, p=2, k=2, neighbours=loss.neighbours, hard_negative_fraction=1.0,
                        batches_per_epoch=30)

    def twins() -> int:
        batches = [sorted({int(labels[i]) for i in batch}) for batch in sampler]
        return sum(a ^ 1 == b for a, b in batches)

    assert twins() < 20  # no tree yet: no neighbours, random partners
    loss.on_epoch_start(1, counting_context(points, labels, []))
    assert twins() == 30  # the same sampler now pairs every label with its tree neighbour


def test_gradient_descent_with_htl_reduces_the_loss():
    torch.manual_seed(0)
    points, labels = samples(paired_centres(4), per_class=4, noise=0.6)
    loss = HierarchicalTripletLoss()
    loss.on_epoch_start(1, counting_context(points, labels, []))
    weights = torch.nn.Parameter(torch.as_tensor(points, dtype=torch.float32).clone())
    codes = torch.as_tensor(labels)
    optimiser = torch.optim.SGD([weights], lr=0.5)

    def step() -> torch.Tensor:
        return loss(TrainBatch(weights, weights, codes, torch.full_like(codes, -1))).total

    first = step().item()
    for _ in range(20):
        optimiser.zero_grad()
        value = step()
        value.backward()
        optimiser.step()
    assert first > 0.05 and value.item() < 0.2 * first


# -- the dynamic margin, pair by pair --------------------------------------------------------
def test_every_pair_margin_is_beta_plus_its_merge_threshold_minus_the_anchor_spread():
    points, labels = samples(five_classes(), per_class=5, noise=0.2, seed=1)
    tree = ClassTree.from_embeddings(points, labels, levels=16)
    loss = HierarchicalTripletLoss(beta=0.05)
    loss.set_tree(tree)
    margins = loss.margin_matrix(torch.arange(5))
    for a, n in itertools.permutations(range(5), 2):
        spread = ((points[labels == a][:, None] - points[labels == a][None]) ** 2).sum(-1)
        s_a = spread.sum() / (5 * 4)
        d_h = tree.thresholds[tree.merge_level(a, n)]
        assert margins[a, n].item() == pytest.approx(0.05 + d_h - s_a, abs=1e-5)
    assert len({round(m, 4) for m in margins[~torch.eye(5, dtype=torch.bool)].tolist()}) > 2


def test_a_pair_merged_deeper_in_the_tree_gets_a_smaller_margin_than_one_merged_higher():
    # Anchor class 0 against its twin (1, merged deepest), class 3 and the far class 4.
    tree = ClassTree.from_embeddings(*samples(five_classes()), levels=16)
    loss = HierarchicalTripletLoss(beta=0.1)
    loss.set_tree(tree)
    margins = loss.margin_matrix(torch.tensor([0, 1, 3, 4]))
    levels = [tree.merge_level(0, n) for n in (1, 3, 4)]
    assert levels[0] < levels[1] < levels[2]
    assert margins[0, 1] < margins[0, 2] < margins[0, 3]
    steps = (margins[0, 2] - margins[0, 1], margins[0, 3] - margins[0, 2])
    for step, (low, high) in zip(steps, itertools.pairwise(levels), strict=True):
        assert step.item() == pytest.approx(tree.thresholds[high] - tree.thresholds[low],
                                            abs=1e-5)


def test_a_loose_anchor_class_gets_a_smaller_margin_against_the_same_negative():
    centres = five_classes()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 6)
    noise = np.where(labels[:, None] == 2, 0.4, 0.05)  # class 2 loose, class 3 tight
    points = centres[labels] + noise * rng.standard_normal((len(labels), 8))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    tree = ClassTree.from_embeddings(points, labels)
    loss = HierarchicalTripletLoss(beta=0.1)
    loss.set_tree(tree)
    margins = loss.margin_matrix(torch.tensor([2, 3, 4]))
    assert tree.merge_level(2, 4) == tree.merge_level(3, 4)
    assert margins[0, 2] < margins[1, 2]  # same negative class 4, the loose anchor's is smaller
    difference = tree.within_class_distance(2) - tree.within_class_distance(3)
    assert (margins[1, 2] - margins[0, 2]).item() == pytest.approx(difference, abs=1e-5)


def test_the_loss_is_the_hinge_of_each_triplet_with_its_own_pair_margin():
    points, labels = samples(five_classes(), per_class=3, noise=0.3, seed=2)
    loss = HierarchicalTripletLoss(beta=0.1)
    loss.set_tree(ClassTree.from_embeddings(points, labels))
    x = torch.as_tensor(points, dtype=torch.float32)
    codes = torch.as_tensor(labels)
    expected = []
    for a, p, n in itertools.permutations(range(len(codes)), 3):
        if codes[a] == codes[p] and codes[a] != codes[n]:
            margin = loss.tree.margins(np.array([labels[a]]), np.array([labels[n]]), 0.1)[0]
            d_ap, d_an = ((x[a] - x[p]) ** 2).sum(), ((x[a] - x[n]) ** 2).sum()
            expected.append(max(0.0, float(d_ap - d_an) + margin))
    output = loss(TrainBatch(x, x, codes, torch.full_like(codes, -1)))
    assert output.total.item() == pytest.approx(np.mean(expected), rel=1e-4)
    fixed = HierarchicalTripletLoss(warmup_margin=0.2)(TrainBatch(x, x, codes,
                                                                  torch.full_like(codes, -1)))
    assert fixed.total.item() != pytest.approx(output.total.item(), rel=1e-2)


# -- the rebuild schedule --------------------------------------------------------------------
def test_the_htl_recipe_rebuilds_the_tree_every_epoch_as_the_paper_does():
    from vestis.train.config import load_config

    params = dict(load_config(CONFIGS / "htl.yaml")["loss"])
    assert params.pop("name") == "htl" and params["rebuild_every"] == 1
    loss = create_loss({"name": "htl", **params}, num_labels=5, num_categories=0,
                       feature_dim=8, embed_dim=8)
    calls: list[int] = []
    context = counting_context(*samples(five_classes()), calls)
    for epoch in range(5):
        loss.on_epoch_start(epoch, context)
    assert len(calls) == 5 - params["warmup_epochs"]


def test_each_rebuild_builds_the_tree_from_that_epochs_embeddings():
    first, labels = samples(five_classes())
    second = first.copy()
    second[labels == 2], second[labels == 4] = first[labels == 4], first[labels == 2]
    epochs = {1: first, 2: second}
    loss = HierarchicalTripletLoss(warmup_epochs=1, rebuild_every=1)
    for epoch in (1, 2):
        loss.on_epoch_start(epoch, EpochContext(5, 0, lambda e=epoch: (epochs[e], labels)))
        neighbour_of_3 = loss.neighbours(3)[0]
        assert neighbour_of_3 == (2 if epoch == 1 else 4)  # class 3 looks like 2, then 4

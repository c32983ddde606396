"""Retrieval metrics against hand-worked examples and a brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vestis.evaluation import metrics as metrics_module
from vestis.evaluation import retrieval_metrics


def reference_metrics(queries, query_labels, gallery, gallery_labels, self_index=None, ks=(1, 5)):
    """Plain-Python reference: one loop per query, one per gallery item."""
    scores = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    per_query = []
    for i, label in enumerate(query_labels):
        own = -1 if self_index is None else self_index[i]
        candidates = [j for j in range(len(gallery)) if j != own]
        positives = sorted(
            (scores[i, j] for j in candidates if gallery_labels[j] == label), reverse=True
        )
        negatives = [scores[i, j] for j in candidates if gallery_labels[j] != label]
        if not positives:
            continue
        ranks = [j + sum(1 for n in negatives if n > score) for j, score in enumerate(positives, 1)]
        n_pos = len(positives)
        precisions = [j / rank for j, rank in enumerate(ranks, 1)]
        ap = sum(precisions) / n_pos
        map_r = sum(p for p, rank in zip(precisions, ranks, strict=True) if rank <= n_pos) / n_pos
        r_precision = sum(1 for rank in ranks if rank <= n_pos) / n_pos
        top = sorted(candidates, key=lambda j: -scores[i, j])
        per_query.append((i, ranks[0], ap, map_r, top, r_precision))
    if not per_query:
        return None
    first = np.array([row[1] for row in per_query])
    expected = {f"R@{k}": np.mean(first <= k) for k in ks}
    expected["P@1"] = np.mean(first == 1)
    expected["mAP"] = np.mean([row[2] for row in per_query])
    expected["MAP@R"] = np.mean([row[3] for row in per_query])
    expected["R-precision"] = np.mean([row[5] for row in per_query])
    expected["n_queries"] = len(per_query)
    expected["n_queries_skipped"] = len(query_labels) - len(per_query)
    return expected, per_query


def random_problem(seed, n_queries=40, n_gallery=60, dim=8, n_classes=12):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    query_labels = rng.integers(0, n_classes + 3, n_queries)  # some classes absent
    gallery_labels = rng.integers(0, n_classes, n_gallery)
    queries = centres[query_labels % n_classes] + rng.standard_normal((n_queries, dim))
    gallery = centres[gallery_labels] + rng.standard_normal((n_gallery, dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    return queries.astype(np.float32), query_labels, gallery.astype(np.float32), gallery_labels


def assert_matches_reference(result, expected, per_query, top_n):
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_array_equal(result.query_indices, [row[0] for row in per_query])
    np.testing.assert_array_equal(result.first_positive_rank, [row[1] for row in per_query])
    np.testing.assert_allclose(result.average_precision, [row[2] for row in per_query])
    np.testing.assert_array_equal(result.top_indices, [row[4][:top_n] for row in per_query])


def scores_to_problem(scores, gallery_labels):
    """One query whose dot product with each 1-D gallery item is the given score."""
    gallery = np.asarray(scores, np.float32)[:, None]
    return np.ones((1, 1), np.float32), ["q"], gallery, list(gallery_labels)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed):
    queries, query_labels, gallery, gallery_labels = random_problem(seed)
    expected, per_query = reference_metrics(queries, query_labels, gallery, gallery_labels)
    result = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 5))
    assert_matches_reference(result, expected, per_query, top_n=10)
    assert result.metrics["n_gallery"] == len(gallery)


@pytest.mark.parametrize("seed", range(3))
def test_leave_one_out_matches_brute_force(seed):
    _, _, gallery, labels = random_problem(seed, n_gallery=70, n_classes=25)
    self_index = np.arange(len(gallery))
    expected, per_query = reference_metrics(gallery, labels, gallery, labels, self_index)
    result = retrieval_metrics(
        gallery, labels, gallery, labels, ks=(1, 5), query_gallery_index=self_index, top_n=5
    )
    assert_matches_reference(result, expected, per_query, top_n=5)
    # A query never retrieves itself.
    assert not (result.top_indices == result.query_indices[:, None]).any()


def test_many_positives_uses_sort_path_and_matches_brute_force():
    queries, query_labels, gallery, gallery_labels = random_problem(
        7, n_queries=30, n_gallery=200, n_classes=3
    )
    expected, per_query = reference_metrics(queries, query_labels, gallery, gallery_labels)
    result = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 5))
    assert max(result.n_positives) > metrics_module._SORT_ABOVE_POSITIVES
    assert_matches_reference(result, expected, per_query, top_n=10)


@pytest.mark.parametrize("threshold", [0, 1000])
def test_counting_strategies_agree(monkeypatch, threshold):
    queries, query_labels, gallery, gallery_labels = random_problem(3, n_classes=4)
    baseline = retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    monkeypatch.setattr(metrics_module, "_SORT_ABOVE_POSITIVES", threshold)
    forced = retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    assert forced.metrics == baseline.metrics
    np.testing.assert_array_equal(forced.first_positive_rank, baseline.first_positive_rank)


def test_pos_neg_pos_ranking():
    result = retrieval_metrics(*scores_to_problem([0.9, 0.5, 0.1], ["q", "x", "q"]), ks=(1, 2))
    assert result.metrics["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert result.metrics["MAP@R"] == pytest.approx((1 / 1) / 2)
    assert result.metrics["R@1"] == 1.0
    assert result.metrics["P@1"] == 1.0
    np.testing.assert_array_equal(result.top_indices, [[0, 1, 2]])


def test_neg_pos_neg_pos_ranking():
    result = retrieval_metrics(
        *scores_to_problem([0.9, 0.7, 0.5, 0.3], ["x", "q", "y", "q"]), ks=(1, 2, 5)
    )
    assert result.metrics["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert result.metrics["MAP@R"] == pytest.approx((1 / 2) / 2)
    assert (result.metrics["R@1"], result.metrics["R@2"], result.metrics["R@5"]) == (0, 1, 1)
    assert result.metrics["P@1"] == 0.0
    np.testing.assert_array_equal(result.first_positive_rank, [2])


def expected_over_tie_orders(scores, labels, ks=(1, 2, 3)):
    """Exhaustive reference: each metric averaged over every order of the gallery that
    sorts it by descending score (all orders of tied items, equally likely)."""
    orders = [order for order in itertools.permutations(range(len(scores)))
              if all(scores[a] >= scores[b] for a, b in itertools.pairwise(order))]
    totals: dict[str, float] = {}
    n_pos = sum(label == "q" for label in labels)
    for order in orders:
        relevant = [labels[j] == "q" for j in order]
        ranks = [rank for rank, hit in enumerate(relevant, 1) if hit]
        precisions = [j / rank for j, rank in enumerate(ranks, 1)]
        values = {f"R@{k}": float(ranks[0] <= k) for k in ks}
        values["mAP"] = sum(precisions) / n_pos
        in_r = [p for p, r in zip(precisions, ranks, strict=True) if r <= n_pos]
        values["MAP@R"] = sum(in_r) / n_pos
        values["R-precision"] = sum(r <= n_pos for r in ranks) / n_pos
        values["first rank"] = ranks[0]
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value / len(orders)
    return totals


@pytest.mark.parametrize("seed", range(12))
def test_ties_count_at_their_expected_value_over_random_orders(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(3, 8))
    scores = rng.integers(0, 3, size) / 2  # three levels: many ties
    labels = ["q" if rng.random() < 0.4 else "x" for _ in range(size)]
    labels[int(rng.integers(size))] = "q"
    expected = expected_over_tie_orders(list(scores), labels)
    result = retrieval_metrics(*scores_to_problem(scores, labels), ks=(1, 2, 3))
    for key in ("R@1", "R@2", "R@3", "mAP", "MAP@R", "R-precision"):
        assert result.metrics[key] == pytest.approx(expected[key]), key
    assert result.metrics["P@1"] == pytest.approx(expected["R@1"])
    assert result.first_positive_rank[0] == pytest.approx(expected["first rank"])


def test_tied_negative_counts_half_above_a_positive():
    result = retrieval_metrics(*scores_to_problem([0.5, 0.5, 0.2], ["x", "q", "x"]))
    assert result.metrics["P@1"] == pytest.approx(0.5)
    assert result.metrics["mAP"] == pytest.approx((1 + 1 / 2) / 2)
    assert result.first_positive_rank[0] == pytest.approx(1.5)


def test_identical_vectors_score_at_chance():
    """A collapsed model (every photo the same vector) must not look perfect: 20 photos of
    10 items, leave-one-out, so each query's one positive is among 19 tied photos."""
    vectors = np.ones((20, 8), np.float32) / np.sqrt(8)
    labels = [f"item-{i // 2}" for i in range(20)]
    result = retrieval_metrics(vectors, labels, vectors, labels, ks=(1, 10),
                               query_gallery_index=np.arange(20))
    chance_ap = sum(1 / rank for rank in range(1, 20)) / 19  # E[1/rank], rank uniform on 1..19
    assert result.metrics["R@1"] == pytest.approx(1 / 19)
    assert result.metrics["P@1"] == pytest.approx(1 / 19)
    assert result.metrics["R@10"] == pytest.approx(10 / 19)
    assert result.metrics["mAP"] == pytest.approx(chance_ap)
    assert result.metrics["MAP@R"] == pytest.approx(1 / 19)
    assert result.metrics["R-precision"] == pytest.approx(1 / 19)
    assert result.metrics["n_queries_tied"] == 20


@pytest.mark.parametrize("sort_above", [0, 1000])  # both ways of counting negatives
def test_identical_vectors_of_a_category_dataset_score_at_chance(monkeypatch, sort_above):
    """Many positives per query (category retrieval) in one big tie: P@1 and R-precision are
    the share of positives among the other photos; AP and MAP@R are those of a random
    order (position i holds a positive with probability p/m, and then has on average
    1 + (i-1)(p-1)/(m-1) positives up to it)."""
    vectors = np.ones((60, 4), np.float32) / 2
    labels = [i % 3 for i in range(60)]  # 3 classes of 20
    monkeypatch.setattr(metrics_module, "_SORT_ABOVE_POSITIVES", sort_above)
    result = retrieval_metrics(vectors, labels, vectors, labels, ks=(1,),
                               query_gallery_index=np.arange(60))
    p, m = 19, 59
    share = p / m
    position = np.arange(1, m + 1)
    precision = share * (1 + (position - 1) * (p - 1) / (m - 1)) / position
    assert result.metrics["P@1"] == pytest.approx(share)
    assert result.metrics["R-precision"] == pytest.approx(share)
    assert result.metrics["MAP@R"] == pytest.approx(precision[:p].sum() / p)
    assert result.metrics["mAP"] == pytest.approx(precision.sum() / p)


def test_leave_one_out_excludes_self_from_positives_and_negatives():
    # Query 0 is gallery item 0 (score 1, same label); without exclusion it would rank first.
    gallery = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    labels = ["a", "b", "a"]
    result = retrieval_metrics(gallery[:1], ["a"], gallery, labels, query_gallery_index=[0])
    np.testing.assert_array_equal(result.first_positive_rank, [2])
    assert result.metrics["mAP"] == pytest.approx(1 / 2)
    np.testing.assert_array_equal(result.top_indices, [[1, 2]])


def test_queries_without_positives_are_skipped_and_counted():
    gallery = np.eye(3, dtype=np.float32)
    result = retrieval_metrics(
        gallery, ["a", "solo", "zzz"], gallery, ["a", "solo", "a"], query_gallery_index=[0, 1, -1]
    )
    # "solo" only matches itself (excluded); "zzz" is absent from the gallery.
    assert result.metrics["n_queries"] == 1
    assert result.metrics["n_queries_skipped"] == 2
    np.testing.assert_array_equal(result.query_indices, [0])


def test_string_and_integer_labels_give_the_same_result():
    queries, query_labels, gallery, gallery_labels = random_problem(5)
    as_ints = retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    as_strings = retrieval_metrics(
        queries,
        [f"item-{label}" for label in query_labels],
        gallery,
        np.array([f"item-{label}" for label in gallery_labels]),
    )
    assert as_ints.metrics == as_strings.metrics


@pytest.mark.parametrize("block_size", [1, 3, 17, 4096])
def test_block_size_does_not_change_results(block_size):
    queries, query_labels, gallery, gallery_labels = random_problem(11, n_queries=50)
    reference = retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    blocked = retrieval_metrics(
        queries, query_labels, gallery, gallery_labels, block_size=block_size
    )
    assert blocked.metrics == pytest.approx(reference.metrics)
    np.testing.assert_array_equal(blocked.top_indices, reference.top_indices)
    np.testing.assert_allclose(blocked.average_precision, reference.average_precision)


def test_recall_curve_agrees_with_metrics():
    queries, query_labels, gallery, gallery_labels = random_problem(2)
    result = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 5, 10, 50))
    curve = result.recall_curve(50)
    assert curve.shape == (50,)
    assert np.all(np.diff(curve) >= 0)
    for k in (1, 5, 10, 50):
        assert curve[k - 1] == pytest.approx(result.metrics[f"R@{k}"])


def test_metrics_are_plain_python_numbers():
    queries, query_labels, gallery, gallery_labels = random_problem(0)
    result = retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    assert all(type(value) in (int, float) for value in result.metrics.values())


def test_top_n_is_capped_by_gallery_size():
    gallery = np.eye(3, dtype=np.float32)
    result = retrieval_metrics(
        gallery, ["a", "a", "b"], gallery, ["a", "a", "b"], query_gallery_index=[0, 1, 2], top_n=10
    )
    assert result.top_indices.shape == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_labels": ["a"]}, "query labels"),
        ({"gallery_labels": ["a"]}, "gallery labels"),
        ({"query_emb": np.ones(4, np.float32)}, "2-D"),
        ({"query_emb": np.ones((0, 2), np.float32), "query_labels": []}, "empty"),
        ({"gallery_emb": np.ones((3, 5), np.float32)}, "dim"),
        ({"query_emb": np.full((2, 2), np.nan, np.float32)}, "NaN"),
        ({"query_gallery_index": [0]}, "shape"),
        ({"query_gallery_index": [0, 3]}, "values"),
        ({"query_gallery_index": [0.0, 1.0]}, "integers"),
        ({"ks": []}, "at least one"),
        ({"ks": [0, 1]}, "at least 1"),
        ({"ks": [1.5]}, "integer"),
        ({"block_size": 0}, "block_size"),
        ({"top_n": -1}, "top_n"),
        ({"query_labels": ["x", "y"]}, "no query has a positive"),
        ({"query_labels": [["a"], ["b"]]}, "hashable"),
    ],
)
def test_invalid_input_raises_clear_value_error(kwargs, message):
    arguments = {
        "query_emb": np.eye(2, dtype=np.float32),
        "query_labels": ["a", "b"],
        "gallery_emb": np.eye(3, 2, dtype=np.float32),
        "gallery_labels": ["a", "b", "a"],
    }
    arguments.update(kwargs)
    positional = [arguments.pop(name) for name in list(arguments)[:4]]
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(*positional, **arguments)

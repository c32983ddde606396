"""Outfit completion metrics: does a garment photo retrieve the products that go with it?

Each query is a photo of a product with at least one related product (``related.csv``
links, used in both directions). Catalog products are ranked by their best-scoring image,
leaving out the query's own product and, by default, its own kind of garment: categories
with the same last segment (``Men/Tops/Hoodies & Sweatshirts`` and
``Women/Tops/Hoodies & Sweatshirts``), since one does not complete a hoodie with a hoodie.
**Recall@K** is the hit rate of at least one related product in the top K; **mAP**
averages the precision at each related product's rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from vestis.taxonomy import leaf_key


def related_map(links: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    related: dict[str, set[str]] = defaultdict(set)
    for a, b in links:
        if a != b:
            related[a].add(b)
            related[b].add(a)
    return dict(related)


def rank_products(scores: np.ndarray, products: Sequence[str], categories: Sequence[str | None],
                  own_product: str, own_category: str | None,
                  exclude_category: bool = True) -> list[str]:
    """Products by their best image's score, best first, without the query's own product
    (and category)."""
    best: dict[str, float] = {}
    own_leaf = leaf_key(own_category)
    for i in np.argsort(-scores, kind="stable"):
        product = products[i]
        if product == own_product or product in best:
            continue
        if exclude_category and own_leaf is not None and leaf_key(categories[i]) == own_leaf:
            continue
        best[product] = float(scores[i])
    return list(best)


def outfit_report(scores: np.ndarray, query_products: Sequence[str],
                  query_categories: Sequence[str | None], gallery_products: Sequence[str],
                  gallery_categories: Sequence[str | None], related: dict[str, set[str]],
                  ks: Sequence[int] = (1, 5, 10), exclude_category: bool = True) -> dict:
    """``scores`` is (queries, gallery images); queries without related products are
    skipped."""
    hits = {k: [] for k in ks}
    aps = []
    for row, product, category in zip(scores, query_products, query_categories, strict=True):
        wanted = related.get(product)
        if not wanted:
            continue
        ranked = rank_products(row, gallery_products, gallery_categories, product, category,
                               exclude_category)
        relevant = np.array([p in wanted for p in ranked], dtype=bool)
        for k in ks:
            hits[k].append(bool(relevant[:k].any()))
        if relevant.any():
            precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
            aps.append(float(precision[relevant].sum() / len(wanted)))
        else:
            aps.append(0.0)
    report = {f"R@{k}": float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    report["mAP"] = float(np.mean(aps)) if aps else float("nan")
    report["queries"] = len(aps)
    return report

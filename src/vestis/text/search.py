"""Text search over a catalog: BM25, the aligned embedding, or both fused.

* ``embedding``: the query's MiniLM vector, mapped into the catalog's image space by the
  alignment head, searches the image vectors (finds items by what they look like).
* ``bm25``: lexical match against item texts (name, colour, category, description, attributes).
* ``hybrid``: reciprocal-rank fusion (RRF) of the two rankings. RRF uses ranks only, so the
  two scores (cosine, BM25) need no calibration against each other.

:func:`search_image_text` answers "like this photo, but in red": the photo's vector and the
text's aligned vector are mixed into one query (and, in ``hybrid`` mode, fused with BM25 of
the text).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vestis.catalog.catalog import Catalog, Match
from vestis.catalog.store import ImageRow
from vestis.data.products import Product
from vestis.text.align import TextAlignment, alignment_for
from vestis.text.lexical import COLOUR_WEIGHT, LexicalIndex

MODES = ("hybrid", "embedding", "bm25")
#: RRF constant and the weight of the BM25 ranking (the embedding's is 1): score = sum of
#: weight / (RRF_K + rank), ranks from 1. Chosen on a dev split of the *training* products
#: (bench/bench_text.py reports the held-out ones): BM25 is the stronger ranker on shop texts,
#: so it leads, and the embedding reorders its ties (colours of one product share a
#: description) and rescues queries with no word in common with the catalog.
RRF_K = 5
LEXICAL_WEIGHT = 2.0
#: Each ranking contributes at least this many candidates to the fusion.
FUSION_DEPTH = 100

_LOCK = threading.Lock()
_LEXICAL: dict[tuple, _CatalogTexts] = {}


class _CatalogTexts:
    """A catalog's BM25 index and, per item, its metadata and a representative image."""

    def __init__(self, catalog: Catalog, products: Mapping[str, Product] | None,
                 colour_weight: int):
        self.items: dict[str, tuple[dict[str, Any], list[ImageRow]]] = {}
        self.item_of: dict[int, str] = {}
        for item_id in catalog.item_ids():
            item = catalog.get(item_id)
            self.items[item_id] = (item.metadata, _front_first(item.images))
            self.item_of.update((image.image_id, item_id) for image in item.images)
        metadata = ((item_id, meta) for item_id, (meta, _) in self.items.items())
        self.index = LexicalIndex.from_items(metadata, products, colour_weight)

    def allowed(self, catalog: Catalog, where: Mapping[str, Any] | None) -> set[str] | None:
        """The items with an image the catalog's ``where`` filter keeps (the store's
        semantics, :meth:`vestis.catalog.backend.CatalogStore.filtered_image_ids`)."""
        if not where:
            return None
        kept = catalog.image_ids_where(dict(where))
        return {self.item_of[i] for i in kept.tolist() if i in self.item_of}

    def match(self, item_id: str, score: float) -> Match:
        metadata, images = self.items[item_id]
        image = images[0]
        return Match(item_id, score, image.image_id, image.path,
                     {**metadata, **image.metadata}, image.box)


def _front_first(images: Sequence[ImageRow]) -> list[ImageRow]:
    """The item's images, its front view (``view: main``) first, when it has one."""
    return sorted(images, key=lambda row: (row.metadata.get("view") != "main", row.image_id))


def catalog_texts(catalog: Catalog, products: Mapping[str, Product] | None = None,
                  colour_weight: int = COLOUR_WEIGHT, refresh: bool = False) -> _CatalogTexts:
    """The catalog's BM25 index, cached per process and keyed on the catalog's
    :attr:`~vestis.catalog.Catalog.generation`: any write (a metadata update too, by any
    process) makes the next search rebuild it. ``refresh`` forces a rebuild."""
    key = (str(Path(catalog.path).resolve()), catalog.generation, id(products), colour_weight)
    with _LOCK:
        if refresh or key not in _LEXICAL:
            stale = [k for k in _LEXICAL if k[0] == key[0]]
            for k in stale:
                del _LEXICAL[k]
            _LEXICAL[key] = _CatalogTexts(catalog, products, colour_weight)
        return _LEXICAL[key]


def rrf(rankings: Sequence[Sequence[str]], weights: Sequence[float] | None = None,
        k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: items by the sum of ``weight / (k + rank)``, best first."""
    weights = weights or [1.0] * len(rankings)
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item_id in enumerate(ranking, start=1):
            scores[item_id] = scores.get(item_id, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def _alignment(catalog: Catalog, alignment: TextAlignment | None) -> TextAlignment:
    alignment = alignment or alignment_for(catalog.model_id)
    alignment.check(catalog.model_id)
    return alignment


def text_vector(catalog: Catalog, text: str, alignment: TextAlignment | None = None) -> np.ndarray:
    """The query vector of ``text`` in the catalog's image space (unit length)."""
    return _alignment(catalog, alignment).embed([text])[0]


def _fuse(catalog: Catalog, vector_hits: list[Match], lexical: list[tuple[str, float]],
          texts: _CatalogTexts, k: int, rrf_k: int) -> list[Match]:
    by_item = {match.item_id: match for match in vector_hits}
    rankings = [[m.item_id for m in vector_hits], [item_id for item_id, _ in lexical]]
    fused = rrf(rankings, [1.0, LEXICAL_WEIGHT], k=rrf_k)
    out = []
    for item_id, score in fused[:k]:
        hit = by_item.get(item_id)
        out.append(Match(item_id, score, hit.image_id, hit.path, hit.metadata, hit.box)
                   if hit else texts.match(item_id, score))
    return out


def search_text(
    catalog: Catalog,
    text: str,
    k: int = 10,
    *,
    where: dict[str, Any] | None = None,
    mode: str = "hybrid",
    products: Mapping[str, Product] | None = None,
    alignment: TextAlignment | None = None,
    rrf_k: int = RRF_K,
) -> list[Match]:
    """The ``k`` best items for a text query ("navy full-zip hoodie", "black hoodie").

    ``mode``: ``hybrid`` (default), ``embedding`` or ``bm25`` (see the module docstring).
    ``where`` filters on metadata as :meth:`Catalog.search` does. ``products``: a products
    table (:func:`vestis.data.products.read_products`) that adds descriptions and attributes
    to BM25's item texts when the catalog's metadata lacks them. ``alignment``: the head
    (default: the shipped one for the catalog's model). Match scores are cosines
    (``embedding``), BM25 scores (``bm25``) or RRF scores (``hybrid``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not text.strip():
        raise ValueError("the text query is empty")
    depth = max(k, FUSION_DEPTH) if mode == "hybrid" else k
    hits: list[Match] = []
    if mode != "bm25":
        vector = text_vector(catalog, text, alignment)
        hits = catalog.search_vectors(vector[None], depth, where=where)[0]
        if mode == "embedding":
            return hits
    texts = catalog_texts(catalog, products)
    lexical = texts.index.search(text, depth, texts.allowed(catalog, where))
    if mode == "bm25":
        return [texts.match(item_id, score) for item_id, score in lexical]
    return _fuse(catalog, hits, lexical, texts, k, rrf_k)


def mix(image_vector: np.ndarray, text_vector: np.ndarray, text_weight: float) -> np.ndarray:
    """``(1 - w) * image + w * text``, of unit length (both inputs are unit vectors)."""
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be between 0 and 1, got {text_weight}")
    query = (1.0 - text_weight) * image_vector + text_weight * text_vector
    return (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)


def search_image_text(
    catalog: Catalog,
    image: Any,
    text: str,
    k: int = 10,
    text_weight: float = 0.5,
    *,
    where: dict[str, Any] | None = None,
    mode: str = "hybrid",
    products: Mapping[str, Product] | None = None,
    alignment: TextAlignment | None = None,
    rrf_k: int = RRF_K,
) -> list[Match]:
    """Items like a photo, changed by a text: "like this photo, but in red".

    ``image``: a path, bytes, PIL image or a vector of the catalog's model. The query is
    :func:`mix` of the photo's vector and the text's aligned vector (``text_weight`` 0 is a
    plain image search). ``mode="hybrid"`` (default) also fuses BM25 of the text (RRF)
    among the mixed vector's candidates, which pulls those whose own metadata says "red" up
    the ranking; ``embedding`` is the
    mixed vector alone (held-out Luma: 92% vs 40-58% of the top 5 in the asked colour).
    """
    if mode not in ("hybrid", "embedding"):
        raise ValueError(f"mode must be 'hybrid' or 'embedding', got {mode!r}")
    photo = image if isinstance(image, np.ndarray) else catalog.embed(image)
    query = mix(np.asarray(photo, dtype=np.float32).ravel(),
                text_vector(catalog, text, alignment), text_weight)
    depth = max(k, FUSION_DEPTH) if mode == "hybrid" else k
    hits = catalog.search_vectors(query[None], depth, where=where)[0]
    if mode == "embedding" or not text.strip():
        return hits[:k]
    # The words re-rank what looks like the photo: BM25 only among the photo's candidates,
    # its ties (every red item scores alike for "in red") broken by the photo's order, so
    # "in red" brings red hoodies for a hoodie, not red shorts.
    texts = catalog_texts(catalog, products)
    order = {match.item_id: rank for rank, match in enumerate(hits)}
    lexical = sorted(texts.index.search(text, len(order), set(order)),
                     key=lambda pair: (-round(pair[1], 6), order[pair[0]]))
    return _fuse(catalog, hits, lexical, texts, k, rrf_k)

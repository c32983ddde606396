"""BM25 over item texts: the lexical baseline of text search, and half of the hybrid.

Documents are built from catalog metadata (name, colour, category, description when
present) plus the item's product attributes when a products table is given. The item's own
``colour`` and category words are also indexed as *field* tokens (``=black``, ``=hoody``),
repeated ``colour_weight`` times, and a query word that names a field value matches that
field too: descriptions name other colours ("gray and black color blocking"), and the
item's own colour must outweigh them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vestis.data.products import Product
from vestis.text.texts import category_words, field, item_text

STOPWORDS = frozenset(
    "a an and are as at be by for from has in is it its of on or that the this to was were "
    "will with you your yours our we i me my just what when while which who can not no so "
    "than too very s t".split())
#: Spelling variants mapped to the catalog's words, on queries and documents alike.
SYNONYMS = {"grey": "gray", "tshirt": "tee", "tshirts": "tee"}
COLOUR_WEIGHT = 2
FIELD = "="


def stem(word: str) -> str:
    """A light plural stemmer: ``hoodies``/``hoodie``/``hoody`` → ``hoody``,
    ``dresses`` → ``dress``, ``tees`` → ``tee``."""
    if len(word) > 4 and word.endswith("sses"):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 3 and word.endswith("ie"):
        word = word[:-2] + "y"
    return word


def tokenize(text: str) -> list[str]:
    """Lower-case word stems without stop words; ``t-shirt`` is one word."""
    text = re.sub(r"\bt[- ]shirts?\b", "tshirt", text.lower())
    words = (SYNONYMS.get(word, word) for word in re.findall(r"[a-z0-9]+", text))
    return [stem(word) for word in words if word not in STOPWORDS]


def item_tokens(metadata: Mapping[str, Any], products: Mapping[str, Product] | None = None,
                colour_weight: int = COLOUR_WEIGHT) -> list[str]:
    """The BM25 document of one item: its full text, plus its colour and category words as
    field tokens (``=black``), ``colour_weight`` times."""
    fields = tokenize(f"{field(metadata, 'colour')} {category_words(field(metadata, 'category'))}")
    return tokenize(item_text(metadata, products)) + [FIELD + t for t in fields] * colour_weight


@dataclass
class LexicalIndex:
    """BM25 (Okapi) over one document per item."""

    item_ids: list[str]
    documents: list[list[str]]
    k1: float = 1.2
    b: float = 0.75

    def __post_init__(self) -> None:
        from rank_bm25 import BM25Okapi

        if not self.item_ids:
            raise ValueError("a lexical index needs at least one item")
        # rank_bm25 divides by zero on an empty document; a placeholder keeps it defined.
        self._bm25 = BM25Okapi([doc or ["\x00"] for doc in self.documents], k1=self.k1, b=self.b)
        self._position = {item_id: n for n, item_id in enumerate(self.item_ids)}

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, Mapping[str, Any]]],
                   products: Mapping[str, Product] | None = None,
                   colour_weight: int = COLOUR_WEIGHT, **kwargs) -> LexicalIndex:
        """From (item_id, metadata) pairs."""
        ids, docs = [], []
        for item_id, metadata in items:
            ids.append(item_id)
            docs.append(item_tokens(metadata, products, colour_weight))
        return cls(ids, docs, **kwargs)

    def query_tokens(self, query: str) -> list[str]:
        """The query's words, plus the field token of each word that is a field value."""
        tokens = tokenize(query)
        return tokens + [FIELD + t for t in tokens if FIELD + t in self._bm25.idf]

    def scores(self, query: str) -> np.ndarray:
        tokens = self.query_tokens(query)
        if not tokens:
            return np.zeros(len(self.item_ids))
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float64)

    def search(self, query: str, k: int = 10,
               allowed: Sequence[str] | set[str] | None = None) -> list[tuple[str, float]]:
        """The ``k`` best (item_id, score) pairs with a positive score, best first."""
        scores = self.scores(query)
        if allowed is not None:
            mask = np.zeros(len(scores), dtype=bool)
            mask[[self._position[i] for i in allowed if i in self._position]] = True
            scores = np.where(mask, scores, 0.0)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.item_ids[n], float(scores[n])) for n in order if scores[n] > 0]

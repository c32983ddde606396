"""Offline text search: MiniLM sentence vectors aligned to a catalog model's image space,
BM25 over item texts, and their fusion. See :func:`search_text` and :func:`search_image_text`.

Heavy pieces load lazily: importing this package loads neither the sentence model nor a head.
"""

from vestis.text.align import (
    AlignmentHead,
    TextAlignment,
    alignment_for,
    info_nce,
    load_alignment,
    train_alignment,
)
from vestis.text.encoder import TextEncoder, TextEncoderMissing, embed_texts, text_encoder
from vestis.text.lexical import LexicalIndex, tokenize
from vestis.text.search import MODES, catalog_texts, mix, rrf, search_image_text, search_text
from vestis.text.texts import item_text, item_variants, leaf_word

__all__ = [
    "MODES",
    "AlignmentHead",
    "LexicalIndex",
    "TextAlignment",
    "TextEncoder",
    "TextEncoderMissing",
    "alignment_for",
    "catalog_texts",
    "embed_texts",
    "info_nce",
    "item_text",
    "item_variants",
    "leaf_word",
    "load_alignment",
    "mix",
    "rrf",
    "search_image_text",
    "search_text",
    "text_encoder",
    "tokenize",
    "train_alignment",
]

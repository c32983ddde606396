"""Product category paths (``Men/Tops/Hoodies & Sweatshirts``): the one reading of them.

Depends on nothing in vestis, so every layer (text search, outfits, evaluation, training)
reads categories the same way.
"""

from __future__ import annotations


def category_leaf(category: str | None) -> str:
    """The last non-empty level of a category path, as written: ``Hoodies & Sweatshirts``
    (``""`` for no category)."""
    parts = [part.strip() for part in str(category or "").split("/") if part.strip()]
    return parts[-1] if parts else ""


def leaf_key(category: str | None) -> str | None:
    """The leaf for comparisons: case-folded, ``None`` when there is none, so that two
    unknown categories never count as the same kind of garment."""
    return category_leaf(category).casefold() or None

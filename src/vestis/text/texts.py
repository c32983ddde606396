"""Texts of catalog items: what BM25 indexes, what the alignment head learns from.

An item is one product in one colour, so every text of an item names its colour: the
image vectors tell colours apart, and a text without its colour could not be told from the
item's other colours. Item metadata follows the Luma catalog columns (``name``, ``colour``,
``category``, ``product``); ``description`` and product attributes come from the item's
metadata when present, else from an optional products table (:func:`read_products`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vestis.data.products import Product
from vestis.taxonomy import category_leaf

#: Words that are plural in their singular sense: a "pants" query stays "pants".
PLURALE_TANTUM = {"pants", "shorts", "leggings", "tights", "jeans", "trousers", "capris"}
#: Attribute columns that say nothing a shopper types.
SKIPPED_ATTRIBUTES = ("eco_collection", "performance_fabric")


def field(metadata: Mapping[str, Any], name: str) -> str:
    value = metadata.get(name)
    return "" if value is None else str(value).strip()


def category_words(category: str) -> str:
    """``Men/Tops/Hoodies & Sweatshirts`` → ``Men Tops Hoodies & Sweatshirts``."""
    return " ".join(part.strip() for part in category.split("/") if part.strip())


def leaf_word(category: str) -> str:
    """The garment word of a category, singular: ``Men/Tops/Hoodies & Sweatshirts`` →
    ``hoodie``, ``Women/Bottoms/Pants`` → ``pants``."""
    words = re.findall(r"[a-z]+", category_leaf(category).lower())
    return singular(words[0]) if words else ""


def singular(word: str) -> str:
    if word in PLURALE_TANTUM or len(word) <= 3 or not word.endswith("s") or word.endswith("ss"):
        return word
    return word[:-2] if word.endswith("sses") else word[:-1]


def strip_name(description: str, name: str) -> str:
    """The description without the product's name (case-insensitive)."""
    if not name:
        return description
    return re.sub(re.escape(name), " ", description, flags=re.IGNORECASE).strip()


def attribute_text(attributes: Mapping[str, Any]) -> str:
    parts = []
    for column, values in attributes.items():
        if column in SKIPPED_ATTRIBUTES or not values:
            continue
        values = values if isinstance(values, (list, tuple)) else str(values).split(";")
        values = [str(v).strip() for v in values if str(v).strip()]
        if values:
            parts.append(f"{column.replace('_', ' ')}: {', '.join(values)}")
    return ". ".join(parts)


def product_of(metadata: Mapping[str, Any],
               products: Mapping[str, Product] | None) -> Product | None:
    key = field(metadata, "product")
    return products.get(key) if products and key else None


def item_text(metadata: Mapping[str, Any], products: Mapping[str, Product] | None = None) -> str:
    """The full text of an item: colour and name, category, description, attributes."""
    product = product_of(metadata, products)
    name = field(metadata, "name") or (product.name if product else "")
    colour = field(metadata, "colour")
    description = field(metadata, "description") or (product.description if product else "")
    attributes = product.attributes if product else {}
    parts = [f"{colour} {name}".strip(), category_words(field(metadata, "category")),
             description, attribute_text(attributes)]
    return ". ".join(part for part in parts if part)


def item_variants(metadata: Mapping[str, Any],
                  products: Mapping[str, Product] | None = None) -> dict[str, str]:
    """The texts an item is learned from, by template: the full text, colour + name,
    colour + garment word (``black hoodie``), colour + category, and colour + description
    without the name. Shoppers type all of these; each keeps the item's colour."""
    product = product_of(metadata, products)
    name = field(metadata, "name") or (product.name if product else "")
    colour = field(metadata, "colour")
    category = field(metadata, "category")
    description = field(metadata, "description") or (product.description if product else "")
    gender = category.split("/")[0].strip() if "/" in category else ""
    variants = {
        "full": item_text(metadata, products),
        "name": f"{colour} {name}".strip(),
        "short": f"{colour} {leaf_word(category)}".strip(),
        "gendered": f"{colour} {gender.lower()}'s {leaf_word(category)}".strip()
        if gender else "",
        "category": f"{colour} {category_words(category)}".strip(),
        "description": f"{colour}. {strip_name(description, name)}".strip(". ")
        if description else "",
    }
    return {key: text for key, text in variants.items() if text}

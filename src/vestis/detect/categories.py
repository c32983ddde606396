"""Which garment a product is about, and which garment groups may match each other.

A shop photo shows a model wearing the product together with other clothes. The item's
``category`` says which garment is the product: :func:`category_group` maps a category
(``Men/Tops/Jackets``, ``T-Shirt``, ``Pants``) to a garment group by keywords, and
:func:`product_box` takes the box of that garment among the parser's regions (or of the
largest garment when the category maps to no group, or there is no category).

Keywords are matched against the words of the category's segments, last segment first, so
``Men/Tops/Jackets`` is ``outer`` (from "jackets") before it is ``upper`` (from "tops"). A
word matches a keyword in singular or plural. Pass your own ``keywords`` (or an exact
``{category: group}`` table through :func:`category_mapping`) to change the mapping.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from .groups import GARMENT_GROUPS

#: group -> keywords; the default mapping of product categories to garment groups.
CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "outer": ("jacket", "coat", "blazer", "outerwear", "outwear", "parka", "cardigan", "vest",
              "gilet", "windbreaker", "anorak", "poncho", "cape", "suit"),
    "upper": ("top", "tee", "t-shirt", "tshirt", "shirt", "blouse", "hoodie", "sweatshirt",
              "sweater", "jumper", "longsleeve", "polo", "tank", "bra", "undershirt", "body",
              "bodysuit", "camisole", "cami", "knit", "pullover", "tunic", "crop-top"),
    "lower": ("pant", "pants", "trouser", "jean", "jeans", "short", "shorts", "skirt",
              "legging", "leggings", "bottom", "bottoms", "jogger", "chino", "culotte"),
    "dress": ("dress", "romper", "jumpsuit", "gown", "swimwear", "swimsuit", "playsuit",
              "overall", "dungaree"),
    "footwear": ("shoe", "shoes", "sneaker", "boot", "sandal", "heel", "heels", "loafer",
                 "footwear", "pump", "trainer", "slipper", "flats", "clog", "mule", "espadrille"),
    "bag": ("bag", "purse", "wallet", "backpack", "handbag", "tote", "clutch", "satchel"),
    "headwear": ("hat", "cap", "beanie", "headwear", "beret", "bucket-hat"),
}

#: query garment group -> the catalog garment groups it may be matched with. A top seen in a
#: photo may be sold as a top or as a light jacket (and the reverse); a dress's upper half is
#: often parsed as a top. Every other group matches only itself.
COMPATIBLE_GROUPS: dict[str, tuple[str, ...]] = {
    "upper": ("upper", "outer", "dress"),
    "outer": ("outer", "upper"),
    "lower": ("lower", "dress"),
    "dress": ("dress", "upper", "lower"),
    "footwear": ("footwear",),
    "bag": ("bag",),
    "headwear": ("headwear",),
}

_SEGMENTS = re.compile(r"\s*[/>|]\s*")
_WORDS = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class HasGroupAndMask(Protocol):
    group: str
    box: tuple[int, int, int, int]
    score: float

    @property
    def mask(self): ...


def _forms(word: str) -> tuple[str, ...]:
    """``word`` and its singular candidates: hoodies -> hoodie, dresses -> dress, ..."""
    forms = [word]
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        forms.append(word[:-1])
    return tuple(forms)


def _keyword_table(keywords: Mapping[str, Iterable[str]]) -> dict[str, str]:
    table = {}
    for group, words in keywords.items():
        if group not in GARMENT_GROUPS:
            raise ValueError(f"unknown garment group {group!r}; one of {', '.join(GARMENT_GROUPS)}")
        for word in words:
            table[word.lower()] = group
    return table


def _lookup(category: str, table: Mapping[str, str]) -> str | None:
    for segment in reversed(_SEGMENTS.split(category.strip().lower())):
        words = [w for word in _WORDS.findall(segment) for w in (*word.split("-"), word)]
        for word in reversed(words):
            for form in _forms(word):
                if form in table:
                    return table[form]
    return None


def category_group(category: str | None,
                   keywords: Mapping[str, Iterable[str]] = CATEGORY_KEYWORDS) -> str | None:
    """The garment group of a product category, or ``None`` when no keyword matches."""
    return _lookup(category, _keyword_table(keywords)) if category else None


def category_mapping(exact: Mapping[str, str] | None = None,
                     keywords: Mapping[str, Iterable[str]] = CATEGORY_KEYWORDS
                     ) -> Callable[[str | None], str | None]:
    """A ``category -> group | None`` function: ``exact`` entries first (a value of ``none``
    or ``""`` means "no group"), then the ``keywords`` as in :func:`category_group`."""
    exact = dict(exact or {})
    for category, group in exact.items():
        if group not in ("", "none", *GARMENT_GROUPS):
            raise ValueError(f"category {category!r} maps to unknown group {group!r}; one of "
                             f"{', '.join(GARMENT_GROUPS)} or none")
    table = _keyword_table(keywords)

    def mapping(category: str | None) -> str | None:
        if category is not None and category in exact:
            return exact[category] if exact[category] not in ("", "none") else None
        return _lookup(category, table) if category else None

    return mapping


def compatible_groups(group: str) -> tuple[str, ...]:
    """The catalog groups a query garment of ``group`` may be matched with."""
    return COMPATIBLE_GROUPS.get(group, (group,))


#: group -> the groups whose parsed regions may be parts of a product of that group: a
#: zipped hoodie is often parsed as part top, part jacket; a dress as part top, part skirt.
PRODUCT_PARTS: dict[str, tuple[str, ...]] = {
    "upper": ("upper", "outer"),
    "outer": ("outer", "upper"),
    "dress": ("dress", "upper", "lower"),
}
#: Parts smaller than this fraction of the product's largest part are left out of its box.
MIN_PART = 0.05
#: The product box grows by this fraction of its size on each side (context for the encoder).
BOX_MARGIN = 0.04
#: When to trust the parse of a catalog photo (else the whole photo is the product): its
#: parts cover at least MIN_PRODUCT_AREA of the photo (not a close-up of a fabric detail),
#: their mean probability is at least MIN_PRODUCT_SCORE, and they hold at least
#: MIN_DOMINANCE of all garment pixels found. Only the area test is on by default: with the
#: shipped parser, stricter tests (score 0.85, dominance 0.6) lowered held-out Luma R@1
#: in BENCHMARKS.md ("Garment crops").
MIN_PRODUCT_AREA = 0.05
MIN_PRODUCT_SCORE = 0.0
MIN_DOMINANCE = 0.0


def product_parts(garments: Sequence[HasGroupAndMask], group: str | None,
                  size: tuple[int, int]) -> list:
    """The parsed garments that make up the product of a ``group`` photo of ``size`` (w, h).

    The parts are the garments of the groups in :data:`PRODUCT_PARTS` (or of ``group``
    alone) at least :data:`MIN_PART` of the largest of them; without any (or without a
    ``group``) the largest garment of any group is the product. Empty (the whole photo is
    the product) when the parser found no garment, or the parse is not trusted (see
    :data:`MIN_PRODUCT_AREA`)."""
    if not garments:
        return []
    parts = [g for g in garments if group is not None
             and g.group in PRODUCT_PARTS.get(group, (group,))]
    if not parts:
        parts = [max(garments, key=_area)]
    largest = max(_area(g) for g in parts)
    parts = [g for g in parts if _area(g) >= MIN_PART * largest]
    area = sum(_area(g) for g in parts)
    score = sum(g.score * _area(g) for g in parts) / max(area, 1)
    if area < MIN_PRODUCT_AREA * size[0] * size[1] or score < MIN_PRODUCT_SCORE \
            or area < MIN_DOMINANCE * sum(_area(g) for g in garments):
        return []
    return sorted(parts, key=_area, reverse=True)


def product_box(garments: Sequence[HasGroupAndMask], group: str | None,
                size: tuple[int, int]) -> tuple[tuple[int, int, int, int], str] | None:
    """The box of the garment a photo of a ``group`` product is about, and its group: the
    union of its :func:`product_parts` with a :data:`BOX_MARGIN` margin, clipped to the
    photo's ``size`` (w, h). ``None`` when there are no parts (use the whole photo)."""
    parts = product_parts(garments, group, size)
    if not parts:
        return None
    x1 = min(g.box[0] for g in parts)
    y1 = min(g.box[1] for g in parts)
    x2 = max(g.box[2] for g in parts)
    y2 = max(g.box[3] for g in parts)
    dx, dy = round(BOX_MARGIN * (x2 - x1)), round(BOX_MARGIN * (y2 - y1))
    box = (max(0, x1 - dx), max(0, y1 - dy), min(size[0], x2 + dx), min(size[1], y2 + dy))
    return box, group if any(g.group == group for g in parts) else parts[0].group


def _area(garment: HasGroupAndMask) -> int:
    return int(garment.mask.sum())

"""The garment groups the parser predicts, and how the 59 Clothing Co-Parsing labels map to them.

This dict is the one place that decides the grouping (documented in README.md, "Garment
parser"). Rules:

- ``upper``: tops worn next to the body (shirt, blouse, t-shirt, top, sweater, jumper, ...);
- ``outer``: layers worn over a top (coat, jacket, blazer, suit jacket, cardigan, cape, vest);
- ``lower``: trousers, jeans, leggings, shorts, skirts;
- ``dress``: one-piece garments (dress, romper, swimwear);
- ``footwear``: every kind of shoe;
- ``bag``: bag, purse, wallet;
- ``headwear``: hat;
- ``person``: skin and hair, plus what is worn on the body but is not a garment searched on
  its own: legwear (stockings, tights, socks), jewellery, belt, tie, scarf, gloves, glasses
  and other small accessories. Keeping legwear here stops the ``lower`` box from running down
  to the feet under a skirt;
- ``background``: the ``null`` label.
"""

from __future__ import annotations

import numpy as np

#: Group names, in class-index order. Index 0 is background.
GROUPS: tuple[str, ...] = (
    "background",
    "person",
    "upper",
    "outer",
    "lower",
    "dress",
    "footwear",
    "bag",
    "headwear",
)

#: The groups that are garments: detected as boxes and averaged into the headline mIoU.
GARMENT_GROUPS: tuple[str, ...] = GROUPS[2:]

#: RGB colours for drawing each group.
GROUP_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "person": (255, 214, 170),
    "upper": (230, 25, 75),
    "outer": (245, 130, 48),
    "lower": (0, 130, 200),
    "dress": (145, 30, 180),
    "footwear": (60, 180, 75),
    "bag": (255, 225, 25),
    "headwear": (70, 240, 240),
}

#: Every label of Clothing Co-Parsing's ``labels.txt`` -> its group.
CCP_LABEL_GROUPS: dict[str, str] = {
    "null": "background",
    # person: body, legwear and accessories
    "skin": "person",
    "hair": "person",
    "stockings": "person",
    "tights": "person",
    "socks": "person",
    "accessories": "person",
    "belt": "person",
    "bracelet": "person",
    "earrings": "person",
    "glasses": "person",
    "sunglasses": "person",
    "gloves": "person",
    "necklace": "person",
    "ring": "person",
    "scarf": "person",
    "tie": "person",
    "watch": "person",
    # upper
    "blouse": "upper",
    "bodysuit": "upper",
    "bra": "upper",
    "hoodie": "upper",
    "intimate": "upper",
    "jumper": "upper",
    "shirt": "upper",
    "sweater": "upper",
    "sweatshirt": "upper",
    "t-shirt": "upper",
    "top": "upper",
    # outer
    "blazer": "outer",
    "cape": "outer",
    "cardigan": "outer",
    "coat": "outer",
    "jacket": "outer",
    "suit": "outer",
    "vest": "outer",
    # lower
    "jeans": "lower",
    "leggings": "lower",
    "pants": "lower",
    "panties": "lower",
    "shorts": "lower",
    "skirt": "lower",
    # dress (one-piece)
    "dress": "dress",
    "romper": "dress",
    "swimwear": "dress",
    # footwear
    "boots": "footwear",
    "clogs": "footwear",
    "flats": "footwear",
    "heels": "footwear",
    "loafers": "footwear",
    "pumps": "footwear",
    "sandals": "footwear",
    "shoes": "footwear",
    "sneakers": "footwear",
    "wedges": "footwear",
    # bag
    "bag": "bag",
    "purse": "bag",
    "wallet": "bag",
    # headwear
    "hat": "headwear",
}


def group_index(name: str) -> int:
    try:
        return GROUPS.index(name)
    except ValueError:
        raise ValueError(f"unknown garment group {name!r}; one of {', '.join(GROUPS)}") from None


def label_lookup(labels: list[str]) -> np.ndarray:
    """A 256-entry table mapping label-map values (indices into ``labels``) to group indices.

    Values past the end of ``labels`` map to 255 (ignored by training and evaluation).
    """
    table = np.full(256, 255, dtype=np.uint8)
    for value, label in enumerate(labels):
        if label not in CCP_LABEL_GROUPS:
            raise ValueError(f"label {label!r} has no garment group in CCP_LABEL_GROUPS")
        table[value] = group_index(CCP_LABEL_GROUPS[label])
    return table

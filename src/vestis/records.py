"""One image (or one box in it) and the item it shows: the record that ingest adds to a
catalog, a benchmark ranks and training learns from.

It sits at the bottom of the layers (beside :mod:`vestis.images`), so the catalog, the
evaluation and the training data share it. Each user fills the fields it needs:

* ingest (:func:`vestis.catalog.sources.read_source`): ``path``, ``item_id``, ``box`` and
  ``metadata`` (the CSV's other columns; ``category`` among them);
* evaluation (:mod:`vestis.evaluation.datasets`): ``path``, ``item_id``, ``box``,
  ``category`` and ``in_context`` (a garment box embedded together with its whole photo);
* training (:mod:`vestis.data.datasets`): ``path``, ``item_id`` (the instance label),
  ``category``, ``group`` (labels of one group are different instances of one design, the
  hardest negatives), ``box`` and ``metadata`` (columns that matter only for splitting, such
  as the clothing set's ``sender_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vestis.images import Box

__all__ = ["ImageRecord"]


@dataclass(frozen=True)
class ImageRecord:
    """One image (or one box in it) of an item. ``metadata`` is left out of equality and
    hashing (two records of one image and item are the same record)."""

    path: Path | str  # the image file (absolute where a reader resolved it), or a URI string
    item_id: str  # the item (product, instance label) it shows
    box: Box | None = None  # x1, y1, x2, y2 in pixels of the original image
    category: str | None = None  # the product category, when known
    group: str | None = None  # a design that several items are colours of (training)
    in_context: bool = False  # embed the box together with its whole photo (garment crops)
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

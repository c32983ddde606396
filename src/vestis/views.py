"""Garment views: the one rule for turning a photo (and, optionally, the garment group its
category names) into ``(group, box, vector)`` rows.

The rule: a garment is embedded *in its photo's context*, as the normalised sum of the
whole photo's vector and its crop's (:func:`in_context`); a photo with no garment box is
its whole photo's vector. The default model was trained on whole photos, and a bare crop
lands away from them (BENCHMARKS.md, "Garment crops").

Used by catalog ingest (folders, CSVs, server uploads: :func:`product_view`,
:func:`context_vectors`), query photos and video frames (:func:`query_views`,
:func:`garment_vectors`, :func:`photo_views`) and evaluation (:func:`locate_groups`,
:func:`context_vectors`). Garment boxes come from the parser through
:func:`vestis.detect.categories.product_box`, here only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vestis.detect.categories import product_box
from vestis.detect.groups import GARMENT_GROUPS
from vestis.images import Box, ImageSource, load_image

if TYPE_CHECKING:
    from vestis.detect import GarmentParser
    from vestis.models import Encoder

#: The group reported for a photo searched as a whole (no garment found, or asked for).
WHOLE_IMAGE = "whole image"

#: One view of a query photo: (group, box, parser score, the pixels to embed).
QueryView = tuple[str, Box, float, Image.Image]


def in_context(whole: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Garment vectors in their photos' context: ``whole + crops``, rows L2-normalised
    (``whole`` may be one row shared by every crop)."""
    fused = crops + whole
    return fused / np.linalg.norm(fused, axis=-1, keepdims=True).clip(1e-12)


def context_vectors(encoder: Encoder, sources: Sequence[ImageSource],
                    boxes: Sequence[Box | None], *, whole: np.ndarray | None = None,
                    progress: bool = False) -> np.ndarray:
    """Each photo's vector in context: rows with a box get :func:`in_context` of the whole
    photo and the box's crop, rows without one the whole photo's vector. ``whole``: the
    photos' whole vectors when already computed (they are not embedded again)."""
    if len(boxes) != len(sources):
        raise ValueError(f"{len(boxes)} boxes for {len(sources)} images")
    vectors = encoder.embed(sources, progress=progress) if whole is None else whole.copy()
    boxed = [i for i, box in enumerate(boxes) if box is not None]
    if boxed:
        crops = encoder.embed([sources[i] for i in boxed], [boxes[i] for i in boxed],
                              progress=progress)
        vectors[boxed] = in_context(vectors[boxed], crops)
    return vectors


def locate_groups(parser: GarmentParser, image: ImageSource, groups: Iterable[str | None]
                  ) -> dict[str | None, tuple[Box | None, str | None]]:
    """For each wanted group, the box and group of the garment a product photo of that
    group is about (one parse for all); ``(None, group)`` when no garment is trusted."""
    image = load_image(image)
    garments = parser.parse(image)
    located = {}
    for group in groups:
        found = product_box(garments, group, image.size)
        located[group] = found if found is not None else (None, group)
    return located


def locate(parser: GarmentParser, image: ImageSource, group: str | None
           ) -> tuple[Box | None, str | None]:
    """The box and group of the garment a photo of a ``group`` product is about."""
    return locate_groups(parser, image, [group])[group]


def product_view(encoder: Encoder, parser: GarmentParser | None, image: ImageSource,
                 group: str | None) -> tuple[str | None, Box | None, np.ndarray]:
    """A catalog (product) photo as one ``(group, box, vector)`` row: with a ``parser``,
    boxed to the garment ``group`` names (the largest one when ``group`` is None) and
    embedded in context; without one (or when no garment is found), the whole photo."""
    box, found = locate(parser, image, group) if parser is not None else (None, group)
    return found, box, context_vectors(encoder, [image], [box])[0]


def query_views(image: Image.Image, parser: GarmentParser, *, garment: str | None = None,
                fill: tuple[int, int, int] | None = None) -> list[QueryView]:
    """(group, box, score, view to embed) per garment of a query photo, largest first; only
    garments of group ``garment`` when given. A photo with no garment found is searched
    whole (group :data:`WHOLE_IMAGE`), unless a group was asked for."""
    if garment is not None and garment not in GARMENT_GROUPS:
        raise ValueError(f"unknown garment group {garment!r}; one of {', '.join(GARMENT_GROUPS)}")
    found = parser.parse(image)
    if garment is not None:
        found = [g for g in found if g.group == garment]
    elif not found:
        return [(WHOLE_IMAGE, (0, 0, image.width, image.height), 1.0, image)]
    found.sort(key=lambda g: g.area, reverse=True)
    return [(g.group, g.box, g.score, g.crop(image, fill)) for g in found]


def garment_vectors(encoder: Encoder, image: Image.Image, views: list[QueryView]) -> np.ndarray:
    """Each view's vector in the photo's context, as catalog crops are embedded: the whole
    photo's vector (computed once) plus the view's (its crop, painted with the query's
    fill), normalised."""
    if len(views) == 1 and views[0][0] == WHOLE_IMAGE:
        return encoder.embed([image])
    vectors = encoder.embed([image] + [view for *_, view in views])
    return in_context(vectors[0], vectors[1:])


def photo_views(encoder: Encoder, parser: GarmentParser, image: ImageSource, *,
                garment: str | None = None, fill: tuple[int, int, int] | None = None
                ) -> list[tuple[str, Box, np.ndarray]]:
    """Every garment of a query photo as ``(group, box, vector)``, largest first (see
    :func:`query_views`)."""
    image = load_image(image)
    views = query_views(image, parser, garment=garment, fill=fill)
    if not views:
        return []
    vectors = garment_vectors(encoder, image, views)
    return [(group, box, vector) for (group, box, _, _), vector in zip(views, vectors,
                                                                       strict=True)]

"""Garments in catalog and query photos: the crop an item is indexed by, and one search per
garment of a query photo.

Catalog side: with ``crop="auto"`` (the default) each shop photo whose item's category names
a garment group (:func:`vestis.detect.categories.category_group`) is parsed, and that garment
becomes the image's box; a photo whose category names none stays whole. ``crop="garment"``
also crops those, to the largest garment found. Every image whose category maps to a group
(cropped or not) gets a ``garment`` metadata value, the group.

Query side: :func:`search_garments` parses the photo, embeds each garment and searches
the catalog once per garment, among catalog images of compatible groups only
(:data:`vestis.detect.categories.COMPATIBLE_GROUPS`) when the catalog has ``garment`` values.

Both embed a garment in its photo's context, by the one rule of :mod:`vestis.views`
(which also locates the garments).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from vestis.detect.categories import category_mapping, compatible_groups
from vestis.detect.groups import GARMENT_GROUPS
from vestis.images import Box, ImageError, ImageSource, load_image
from vestis.records import ImageRecord
from vestis.views import WHOLE_IMAGE, garment_vectors, locate, query_views

if TYPE_CHECKING:
    from vestis.catalog.catalog import Catalog, Match
    from vestis.detect import GarmentParser

CROP_MODES = ("auto", "none", "garment")
#: What a new catalog crops by (BENCHMARKS.md, "Garment crops at ingest over k-fold runs").
DEFAULT_CROP = "auto"
#: The metadata key that holds an image's garment group.
GARMENT_KEY = "garment"
#: Metadata keys read, in order, for an item's category.
CATEGORY_KEYS = ("category", "label")
#: How the pixels of a garment's box outside its mask are painted before embedding.
MASK_FILLS: dict[str, tuple[int, int, int] | None] = {
    "none": None, "grey": (127, 127, 127), "white": (255, 255, 255)}
__all__ = ["CATEGORY_KEYS", "CROP_MODES", "DEFAULT_CROP", "GARMENT_KEY", "MASK_FILLS",
           "WHOLE_IMAGE", "GarmentCropper", "GarmentHits", "check_crop_mode",
           "garment_vectors", "mask_fill", "parses_photo", "query_views", "search_garments"]


def parses_photo(crop: str, group: str | None) -> bool:
    """Whether ingest with ``crop`` parses a photo whose category names ``group``."""
    return crop == "garment" or (crop == "auto" and group is not None)


def check_crop_mode(crop: str) -> str:
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
    return crop


def mask_fill(name: str) -> tuple[int, int, int] | None:
    if name not in MASK_FILLS:
        raise ValueError(f"mask must be one of {', '.join(MASK_FILLS)}, got {name!r}")
    return MASK_FILLS[name]


@dataclass(frozen=True)
class GarmentHits:
    """One garment of a query photo and the catalog items that match it."""

    group: str
    box: Box
    score: float
    matches: list[Match]

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "box": list(self.box), "score": round(self.score, 4),
                "results": [m.to_dict() for m in self.matches]}


class GarmentCropper:
    """Chooses the crop of each catalog photo: the garment its item's category names."""

    def __init__(self, parser: GarmentParser | None = None,
                 mapping: Callable[[str | None], str | None] | None = None,
                 category_keys: Sequence[str] = CATEGORY_KEYS):
        self._parser = parser
        self.mapping = mapping or category_mapping()
        self.category_keys = tuple(category_keys)

    @property
    def parser(self) -> GarmentParser:
        if self._parser is None:
            from vestis.detect import load_parser

            self._parser = load_parser()
        return self._parser

    def group_of(self, metadata: Mapping[str, Any]) -> str | None:
        """The garment group an item's metadata names: its ``garment`` value when valid,
        else its category's group."""
        given = metadata.get(GARMENT_KEY)
        if given in GARMENT_GROUPS:
            return given
        category = next((str(metadata[k]) for k in self.category_keys if metadata.get(k)), None)
        return self.mapping(category)

    def locate(self, image: ImageSource, group: str | None) -> tuple[Box | None, str | None]:
        """The box and group of the garment a photo of a ``group`` product is about; no box
        when the parser finds no garment."""
        return locate(self.parser, image, group)

    def label(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """Records with their category's ``garment`` group in their metadata (no parsing)."""
        return [self._with_group(record, self.group_of(record.metadata)) for record in records]

    def crop(self, records: Sequence[ImageRecord], crop: str = "garment", *,
             progress: bool = False) -> list[ImageRecord]:
        """Records with the box of their garment and its group, for ingest with ``crop``
        (:func:`parses_photo`). A record that already has a box keeps it, and so does one
        ``crop`` does not parse; an unreadable photo is passed on unchanged (the encoder
        reports it)."""
        out = []
        for record in tqdm(records, desc="finding garments", unit="img", disable=not progress):
            group = self.group_of(record.metadata)
            if record.box is not None or not parses_photo(crop, group):
                out.append(self._with_group(record, group))
                continue
            try:
                box, found = self.locate(record.path, group)
            except ImageError:
                out.append(record)
                continue
            out.append(replace(self._with_group(record, group or found), box=box))
        return out

    @staticmethod
    def _with_group(record: ImageRecord, group: str | None) -> ImageRecord:
        if group is None or record.metadata.get(GARMENT_KEY) == group:
            return record
        return replace(record, metadata={**record.metadata, GARMENT_KEY: group})


def search_garments(catalog: Catalog, query: ImageSource, k: int = 10, *,
                    garment: str | None = None, compatible: bool = True,
                    where: dict[str, Any] | None = None, mask: str = "none",
                    parser: GarmentParser | None = None, rerank=None,
                    rerank_k: int = 50) -> list[GarmentHits]:
    """Top-``k`` items for every garment of a query photo (see :func:`query_views`);
    ``rerank``: a learned matcher re-orders each garment's top items (see
    :meth:`Catalog.search_vectors`).

    ``compatible``: each garment searches only catalog images of compatible groups, when
    the catalog has ``garment`` values (a ``garment`` key in ``where`` overrides it).
    ``mask``: ``none``, ``grey`` or ``white``, paint each crop's non-garment pixels.
    """
    image = load_image(query)
    views = query_views(image, parser or catalog.parser, garment=garment, fill=mask_fill(mask))
    if not views:
        return []
    vectors = garment_vectors(catalog.encoder, image, views)
    filter_groups = compatible and catalog.has_garment_groups and GARMENT_KEY not in (where or {})
    hits = []
    for (group, box, score, _), vector in zip(views, vectors, strict=True):
        condition = dict(where or {})
        if filter_groups and group != WHOLE_IMAGE:
            condition[GARMENT_KEY] = list(compatible_groups(group))
        matches = catalog.search_vectors(vector[None], k, where=condition or None,
                                         rerank=rerank, rerank_k=rerank_k)[0]
        hits.append(GarmentHits(group, box, score, matches))
    return hits

"""Complete the look: catalog items that go with the garment in a photo (Comp-Net).

Every catalog image is mapped into Comp-Net's compatibility space from its ``lite0``
features and its item's semantic labels (``climate``, ``style_*`` metadata when the shop gave
them, predicted ones otherwise). The features are cached next to the catalog
(``outfit-features-<model>.npz``, keyed by image id and content hash), so only new images are
computed, and kept in memory while the catalog's ``generation`` holds (any write makes the
next request re-read the rows). The query's own kind of garment (its nearest catalog item's
category, last segment) is left out by default: a hoodie is completed with pants and tees,
not with more hoodies. Each design (``product`` metadata, else item) appears once, in its
best colour.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from vestis.atomic import atomic_path
from vestis.catalog.annotate import PRODUCT_KEY
from vestis.catalog.garments import CATEGORY_KEYS
from vestis.images import ImageSource, load_image
from vestis.taxonomy import leaf_key

if TYPE_CHECKING:
    from vestis.catalog.catalog import Catalog, Match
    from vestis.models.compnet import OutfitModel

log = logging.getLogger(__name__)

#: A nearest catalog image this close is the query's own item, which is never suggested.
SAME_ITEM_SCORE = 0.95

#: (catalog directory, feature model) -> (generation, catalog_features' result).
_FEATURES: dict[tuple[str, str], tuple[int, tuple]] = {}
_FEATURES_LOCK = threading.Lock()


@dataclass
class OutfitResult:
    """The query's category (from its nearest catalog item) and the items that go with it."""

    category: str | None
    matches: list[Match]

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "results": [m.to_dict() for m in self.matches]}


def _category(metadata: dict) -> str | None:
    for key in CATEGORY_KEYS:
        if metadata.get(key) not in (None, ""):
            return str(metadata[key])
    return None


def _labels(metadata: dict, families) -> dict[str, list[str]]:
    out = {}
    for family in families:
        value = metadata.get(family)
        if value not in (None, ""):
            out[family] = [v.strip() for v in str(value).split(";") if v.strip()]
    return out


def catalog_features(catalog: Catalog, feature_model: str, progress: bool = False):
    """(image rows, item metadata by item, features) of every catalog image, with features
    read from the cache where the image is unchanged. The result is kept in memory under
    the catalog's generation (read before the rows, so a write meanwhile makes it stale);
    one that skipped unreadable files is not kept, so a restored file is tried again."""
    key = (str(catalog.path.resolve()), feature_model)
    generation = catalog.generation
    with _FEATURES_LOCK:
        kept = _FEATURES.get(key)
    if kept is not None and kept[0] == generation:
        return kept[1]
    result, complete = _read_features(catalog, feature_model, progress)
    if complete:
        with _FEATURES_LOCK:
            _FEATURES[key] = (generation, result)
    return result


def _read_features(catalog: Catalog, feature_model: str, progress: bool) -> tuple[tuple, bool]:
    """``catalog_features``' result, and whether every image's features were read."""
    rows, metadata = [], {}
    for item_id in catalog.item_ids():
        item = catalog.get(item_id)
        metadata[item_id] = item.metadata
        rows.extend(item.images)
    cache_path = catalog.path / f"outfit-features-{feature_model}.npz"
    cached: dict[tuple[int, str], np.ndarray] = {}
    if cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as blob:
            for image_id, digest, vector in zip(blob["image_ids"], blob["sha256"],
                                                blob["features"], strict=True):
                cached[(int(image_id), str(digest))] = vector
    missing = [row for row in rows if (row.image_id, row.sha256) not in cached]
    unreadable = _compute_features(catalog, feature_model, missing, cached, progress)
    rows = [row for row in rows if row.image_id not in unreadable]
    features = (np.stack([cached[(r.image_id, r.sha256)] for r in rows]).astype(np.float32)
                if rows else np.zeros((0, 1), np.float32))
    if len(missing) > len(unreadable) or len(cached) != len(rows):
        with contextlib.suppress(OSError), \
                atomic_path(cache_path, suffix=".tmp.npz") as tmp:  # read-only: recompute
            np.savez(tmp, image_ids=np.array([r.image_id for r in rows], dtype=np.int64),
                     sha256=np.array([r.sha256 for r in rows]),
                     features=features.astype(np.float16))
    return (rows, metadata, features), not unreadable


def _compute_features(catalog: Catalog, feature_model: str, rows, cached: dict,
                      progress: bool) -> set[int]:
    """Features of ``rows`` into ``cached``; returns the ids of the images that could not
    be read (missing or broken files), skipped with a warning rather than failing every
    search."""
    unreadable: set[int] = set()
    if not rows:
        return unreadable
    paths = [catalog.file_of(row) for row in rows]
    for batch in _encoder(feature_model).iter_batches(paths, progress=progress):
        for position, vector in zip(batch.indices, batch.vectors, strict=True):
            cached[(rows[position].image_id, rows[position].sha256)] = vector.astype(np.float16)
        for position, error in batch.errors:
            unreadable.add(rows[position].image_id)
            log.warning("complete the look: skipping catalog image %d of item %s: %s",
                        rows[position].image_id, rows[position].item_id, error.reason)
    return unreadable


def complete_outfit(catalog: Catalog, image: ImageSource, k: int = 10, *,
                    model: OutfitModel | None = None, exclude_category: bool = True,
                    where: dict[str, Any] | None = None, progress: bool = False) -> OutfitResult:
    """The ``k`` catalog items that best go with the garment in ``image``."""
    from vestis.catalog.catalog import Match
    from vestis.models.compnet import load_outfit_model

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    model = model or load_outfit_model()
    photo = load_image(image)
    nearest = catalog.search(photo, k=1)
    category = _category(nearest[0].metadata) if nearest else None
    rows, metadata, features = catalog_features(catalog, model.feature_model, progress)
    if not rows:
        return OutfitResult(category, [])
    families = list(model.labels.families)
    gallery = model.embed_features(
        features, [_labels(metadata[r.item_id], families) for r in rows])
    query = model.embed_features(_encoder(model.feature_model).embed([photo]))[0]
    allowed = set(catalog.image_ids_where(where).tolist()) if where else None
    itself = nearest[0].item_id if nearest and nearest[0].score >= SAME_ITEM_SCORE else None
    scores = gallery @ query
    best: dict[str, Match] = {}
    leaf = leaf_key(category)
    for i in np.argsort(-scores, kind="stable"):
        row = rows[i]
        item_meta = {**metadata[row.item_id], **row.metadata}
        design = str(item_meta.get(PRODUCT_KEY) or row.item_id)
        if design in best or row.item_id == itself or (
                allowed is not None and row.image_id not in allowed):
            continue
        if exclude_category and leaf is not None and leaf_key(_category(item_meta)) == leaf:
            continue
        best[design] = Match(row.item_id, float(scores[i]), row.image_id, row.path,
                             item_meta, row.box)
        if len(best) == k:
            break
    return OutfitResult(category, list(best.values()))


@lru_cache(maxsize=2)
def _encoder(name: str):
    from vestis.models.encoder import Encoder

    return Encoder.from_name(name)

"""Ingest: photos (or precomputed vectors) into a catalog's store.

The one path from an encoder's vectors to :meth:`CatalogStore.add_images`, used by
:meth:`vestis.catalog.Catalog.add` (folders, CSVs), :meth:`~vestis.catalog.Catalog.add_vectors`
and the server's uploads (``POST /items``). Invariants:

* images are unique per (item, content hash): re-running an interrupted ingest adds
  exactly what is missing; the hash is the one of the file as given (and its box), never
  of a crop, so a re-run skips a photo unparsed;
* each embedded batch is one store transaction;
* an image whose category names a garment group gets it as ``garment`` metadata, and the
  catalog's ``garment_groups`` meta is set the first time one is stored.

Hashing and embedding run in this process (threads) by default; an :class:`IngestRunner`
(such as :class:`vestis.catalog.ray_ingest.RayRunner`) runs them elsewhere with the same
functions (:func:`vestis.images.file_digest`, the model's preprocessing and backend)
while the writes stay here, through :meth:`Indexer.add`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vestis.catalog.backend import CatalogStore
from vestis.catalog.garments import GARMENT_KEY, GarmentCropper, parses_photo
from vestis.catalog.store import NewImage
from vestis.images import Box, ImageSource, file_digest
from vestis.images import content_hash as content_hash  # the catalog's, re-exported
from vestis.models import Encoder
from vestis.models.encoder import EncodedBatch
from vestis.records import ImageRecord
from vestis.views import context_vectors, product_view

OnError = Callable[[str, str], None] | None
#: Threads reading and hashing source files before embedding (file reads and SHA-256 release
#: the GIL; a few keep a disk busy without starving the encoder's decoders).
HASH_THREADS = 4


@dataclass
class IngestReport:
    added: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def fail(self, on_error: OnError, path: str, reason: str) -> None:
        self.failed.append((path, reason))
        if on_error is not None:
            on_error(path, reason)


def vector_hash(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


def store_images(store: CatalogStore, images: Sequence[NewImage], model_id: str) -> list[int]:
    """One transaction of new images (their items' metadata merged from theirs); marks the
    catalog as having garment groups when one carries a ``garment`` value. Returns the new
    ids, -1 for an image already stored for its item."""
    with store.writing():
        ids = store.add_images(images, _item_metadata(images), model_id=model_id)
        if any(GARMENT_KEY in image.metadata for image in images) \
                and store.get_meta("garment_groups") != "1":
            store.set_meta({"garment_groups": "1"})
    return ids


def vector_rows(item_ids: Sequence[str], vectors: np.ndarray, *,
                paths: Sequence[str] | None = None,
                metadata: Sequence[dict[str, Any]] | None = None,
                boxes: Sequence[Box | None] | None = None,
                hashes: Sequence[str] | None = None) -> list[NewImage]:
    """Rows for precomputed vectors; a row without a content hash keeps its vector's."""
    paths = paths or [""] * len(vectors)
    metadata = metadata or [{} for _ in vectors]
    boxes = boxes or [None] * len(vectors)
    hashes = hashes or [vector_hash(vector) for vector in vectors]
    rows = zip(item_ids, vectors, paths, metadata, boxes, hashes, strict=False)
    return [NewImage(str(item_id), str(path), sha, vector, dict(meta), box)
            for item_id, vector, path, meta, box, sha in rows]


#: One record's content hash, or why its file cannot be read: (record, sha, error).
Digest = tuple[ImageRecord, str | None, str | None]


def digest_record(record: ImageRecord) -> Digest:
    """``(record, content hash, None)``, or ``(record, None, reason)`` when its file (or URI)
    cannot be read or is empty (:func:`vestis.images.file_digest`)."""
    return (record, *file_digest(record.path, record.box))


class IngestRunner(Protocol):
    """Where an ingest's hashing and embedding run (the writes always stay in the caller)."""

    def digests(self, records: Sequence[ImageRecord]) -> Iterable[Digest]:
        """:func:`digest_record` of every record, in input order."""
        ...

    def iter_batches(self, sources: Sequence[ImageSource], boxes: Sequence[Box | None], *,
                     progress: bool = False, desc: str = "embedding") -> Iterator[EncodedBatch]:
        """As :meth:`Encoder.iter_batches` (batches in input order, bad images reported)."""
        ...


def photo_view(encoder: Encoder, cropper: GarmentCropper, image: ImageSource,
               metadata: dict[str, Any], crop: str) -> tuple[np.ndarray, Box | None,
                                                          dict[str, Any]]:
    """One photo as a catalog image: its vector, its box (the garment its metadata names,
    with ``crop`` ``auto`` or ``garment``: see :mod:`vestis.catalog.garments`; none
    otherwise or when no garment is found) and its metadata (with the ``garment`` group,
    when known). What uploads are ingested by."""
    group = cropper.group_of(metadata)
    parser = cropper.parser if parses_photo(crop, group) else None
    found, box, vector = product_view(encoder, parser, image, group)
    fields = {**metadata, GARMENT_KEY: found} if found else dict(metadata)
    return vector, box, fields


class Indexer:
    """Records (paths, items, metadata, boxes) → hashed, located, embedded → the store."""

    def __init__(self, store: CatalogStore, encoder: Encoder, cropper: GarmentCropper,
                 runner: IngestRunner | None = None):
        """``runner``: where hashing and embedding run (default: here, in threads)."""
        self.store = store
        self.encoder = encoder
        self.cropper = cropper
        self.runner = runner

    def add(self, records: Sequence[ImageRecord], crop: str, *, progress: bool = False,
            on_error: OnError = None) -> IngestReport:
        """Add what is not stored yet, under the store's write lock; bad images are
        reported, the rest added."""
        started = time.perf_counter()
        report = IngestReport()
        with self.store.writing():
            hashed = self._hash_records(records, report, on_error, progress)
            known = self.store.known_hashes((r.item_id, sha) for r, sha in hashed)
            todo = [(r, sha) for r, sha in hashed if (r.item_id, sha) not in known]
            report.skipped = len(hashed) - len(todo)
            located = self._locate_garments(todo, crop, progress)
            parsed_box = [new.box is not None and old.box is None
                          for (new, _), (old, _) in zip(located, todo, strict=True)]
            if crop != self.store.get_meta("crop"):
                self.store.set_meta({"crop": crop})
            self._embed_and_store(located, report, on_error, progress, parsed_box)
            self.store.commit()
        report.seconds = time.perf_counter() - started
        return report

    def _locate_garments(self, todo, crop: str, progress: bool) -> list[tuple[ImageRecord, str]]:
        """Each record's garment group and, with ``crop`` ``auto`` or ``garment``, its
        garment's box. The content hash stays the one of the photo as given, so a re-run
        skips it unparsed."""
        records = [record for record, _ in todo]
        if crop != "none":
            records = self.cropper.crop(records, crop, progress=progress)
        else:
            records = self.cropper.label(records)
        if any(GARMENT_KEY in r.metadata for r in records) \
                and self.store.get_meta("garment_groups") != "1":
            self.store.set_meta({"garment_groups": "1"})
        return [(record, sha) for record, (_, sha) in zip(records, todo, strict=True)]

    def _hash_records(self, records, report, on_error, progress) -> list[tuple[ImageRecord, str]]:
        hashed, seen = [], set()
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            if self.runner is not None:
                results = self.runner.digests(records)
            else:
                results = pool.map(digest_record, records)
            bar = tqdm(
                results, total=len(records), desc="hashing", unit="img", disable=not progress
            )
            for record, sha, error in bar:
                if error:
                    report.fail(on_error, str(record.path), error)
                elif (record.item_id, sha) not in seen:
                    seen.add((record.item_id, sha))
                    hashed.append((record, sha))
        return hashed

    def _embed_and_store(self, todo, report, on_error, progress, parsed_box) -> None:
        """Embed and store ``todo``, one transaction per batch; rows flagged ``parsed_box``
        (boxes found by the garment parser) get :func:`vestis.views.context_vectors`,
        the others their box's own."""
        if not todo:
            return
        paths = [record.path for record, _ in todo]
        boxes = [None if context else record.box
                 for (record, _), context in zip(todo, parsed_box, strict=True)]
        embedder = self.runner if self.runner is not None else self.encoder
        for batch in embedder.iter_batches(paths, boxes, progress=progress, desc="indexing"):
            for position, error in batch.errors:
                report.fail(on_error, str(paths[position]), error.reason)
            if not batch.indices:
                continue
            self._add_context(batch, todo, parsed_box)
            new_images = []
            for position, vector in zip(batch.indices, batch.vectors, strict=False):
                record, sha = todo[position]
                new_images.append(NewImage(record.item_id, str(record.path), sha, vector,
                                           record.metadata, record.box))
            ids = self.store.add_images(new_images, _item_metadata(new_images),
                                        model_id=self.encoder.model_id)
            added = sum(1 for i in ids if i != -1)
            report.added += added
            report.skipped += len(ids) - added

    def _add_context(self, batch, todo, parsed_box) -> None:
        """Fuse the whole-photo vectors of a batch's parser-boxed rows with their crops'."""
        rows = [n for n, position in enumerate(batch.indices) if parsed_box[position]]
        if not rows:
            return
        records = [todo[batch.indices[n]][0] for n in rows]
        batch.vectors[rows] = context_vectors(self.encoder, [r.path for r in records],
                                              [r.box for r in records],
                                              whole=batch.vectors[rows])


def _item_metadata(images: Sequence[NewImage]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for image in images:
        merged.setdefault(image.item_id, {}).update(image.metadata)
    return merged

"""A catalog: a store (rows, vectors, metadata, filters: :mod:`vestis.catalog.backend`)
composed with a model (its identity checked on open and on every write) and ingest
(:mod:`vestis.catalog.ingest`).

The store is a :class:`vestis.catalog.local.LocalStore` (SQLite + FAISS in the catalog
directory; its docstring states the crash-safety and index-stamp invariants) or a
:class:`vestis.catalog.milvus.MilvusStore` for a Milvus URI (:mod:`vestis.catalog.stores`). The
catalog adds what needs a model: its identity (``model_name``, ``model_id``, ``dim``, set
once, in one transaction with the index choice), embedding queries, and ingest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vestis.catalog.backend import CatalogStore, ItemHit, ReadOnlyCatalogError, store_kind
from vestis.catalog.garments import (
    DEFAULT_CROP,
    GarmentCropper,
    GarmentHits,
    check_crop_mode,
    search_garments,
)
from vestis.catalog.index import AUTO, default_search_params, resolve_factory
from vestis.catalog.ingest import (
    Indexer,
    IngestReport,
    IngestRunner,
    content_hash,
    store_images,
    vector_hash,
    vector_rows,
)
from vestis.catalog.local import (
    DB_NAME,
    INDEX_NAME,
    INDEX_STAMP_NAME,
    LOCK_NAME,
)
from vestis.catalog.sources import read_source, unique_records
from vestis.catalog.store import ImageRow, ModelMismatchError
from vestis.catalog.stores import check_index_choice, files_dir, open_store, store_exists
from vestis.images import Box, ImageSource
from vestis.models import DEFAULT_MODEL, Encoder
from vestis.models.matcher import DEFAULT_MATCHER, RERANK_K, Matcher, load_matcher
from vestis.records import ImageRecord

__all__ = ["DB_NAME", "INDEX_NAME", "INDEX_STAMP_NAME", "LOCK_NAME", "Catalog", "IngestReport",
           "Item", "Match", "ModelMismatchError", "ReadOnlyCatalogError", "content_hash",
           "vector_hash"]

#: Keys that are not metadata: filters use ``item_id`` for the item itself.
RESERVED_KEYS = frozenset({"item_id"})


@dataclass(frozen=True)
class Match:
    """One catalog item found by a search: the best-matching image of the item."""

    item_id: str
    score: float
    image_id: int
    path: str
    metadata: dict[str, Any]
    box: Box | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "score": round(float(self.score), 6),
            "image_id": self.image_id,
            "path": self.path,
            "box": list(self.box) if self.box else None,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class Item:
    item_id: str
    metadata: dict[str, Any]
    images: list[ImageRow]


class Catalog:
    """A persistent, searchable catalog of garment images.

    >>> catalog = Catalog("shop-catalog", model="lite0")      # creates or opens
    >>> catalog.add("photos/")                                 # folder, CSV or list of paths
    >>> catalog.search("query.jpg", k=10, where={"category": "Tops"})
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model: str | None = None,
        index: str | None = None,
        encoder: Encoder | None = None,
        backend: str = "auto",
        cropper: GarmentCropper | None = None,
        factory: str | None = None,
        store: Callable[[], CatalogStore] | None = None,
    ):
        """Open or create the catalog at ``path``.

        ``path``: a directory (SQLite + FAISS), ``milvus://HOST:PORT/COLLECTION`` (a Milvus
        server) or ``milvus-lite:PATH`` (a Milvus Lite database); see
        :mod:`vestis.catalog.stores`.
        ``model``: a registered model, checkpoint or ONNX file (new catalogs; default
        ``vestis-lite0``). ``index``: the index choice of a new catalog (``auto``, a preset
        or a FAISS factory string; ``--index`` on the command line, stored as
        :attr:`index_choice`; ``factory=`` is its deprecated old name). ``backend``:
        ``auto``, ``onnx`` or ``torch`` inference.
        ``cropper``: how shop photos are cropped to their garment and categories mapped to
        garment groups (default: the shipped parser and :data:`CATEGORY_KEYWORDS`).
        ``store``: opens the store at ``path`` instead of :func:`open_store` (a Milvus
        catalog's next generation, built by :mod:`vestis.catalog.reembed`).
        """
        milvus = store_kind(str(path)) == "milvus"
        #: Where the catalog is, as given (a directory or a Milvus URI), for messages.
        self.location = str(path) if milvus else str(Path(path).expanduser())
        #: The directory of the catalog's files outside the store (relative image paths,
        #: server uploads, caches): the catalog directory, or one for a Milvus catalog.
        self.path = files_dir(path)
        self._backend = backend
        self.cropper = cropper or GarmentCropper()
        index = _deprecated_factory(index, factory)
        if not store_exists(self.location):  # also finishes a re-embedding's swap cut short
            encoder = self._check_new(model, index, encoder)
        self._store = store() if store is not None else open_store(self.location)
        self._encoder = encoder
        self._init_model(model or (encoder.name if encoder else None), index)

    def _check_new(self, model: str | None, choice: str | None,
                   encoder: Encoder | None) -> Encoder:
        """Before a new catalog's files exist: its model loads and its index choice is a
        valid one, so a bad ``--model`` or ``--index`` leaves nothing behind."""
        encoder = encoder or Encoder.from_name(_model_reference(model or DEFAULT_MODEL),
                                               backend=self._backend)
        check_index_choice(self.location, choice or AUTO, encoder.dim)
        return encoder

    # -- identity ----------------------------------------------------------------------
    def _init_model(self, model: str | None, choice: str | None) -> None:
        """A new catalog's model, dimension and index are created together, in one
        transaction under the write lock: of several processes creating one catalog, exactly
        one sets them, and any other with another model or index fails here."""
        if self._store.get_meta("model_name") is None:
            name = _model_reference(model or DEFAULT_MODEL)
            encoder = self._encoder or Encoder.from_name(name, backend=self._backend)
            factory = resolve_factory(choice or AUTO, 0, encoder.dim)
            wanted = {"model_name": name, "model_id": encoder.model_id, "dim": str(encoder.dim),
                      "index_choice": choice or AUTO, "factory": factory,
                      "search_params": default_search_params(factory)}
            stored = self._store.create_meta(wanted, key="model_name")
            if stored == wanted:
                self._encoder = encoder
                return
            self._encoder = self._encoder or encoder
            model = name
        self._check_stored_model(model)
        self._init_index(choice)

    def _check_stored_model(self, model: str | None) -> None:
        stored = self._store.get_meta("model_name")
        if model is None or _model_reference(model) == stored:
            return
        candidate = self._encoder or Encoder.from_name(model, backend=self._backend)
        if candidate.model_id != self._store.get_meta("model_id"):
            raise ModelMismatchError(
                f"catalog {self.location} was built with model {stored!r} "
                f"({self._store.get_meta('model_id')}); it cannot use {model!r} "
                f"({candidate.model_id}). Use a new catalog directory for another model, or "
                f"re-embed this one: vestis reembed --catalog {self.location} --model {model}"
            )
        self._encoder = candidate

    def _init_index(self, choice: str | None) -> None:
        """An existing catalog refuses another index (``rebuild_index`` changes it); one
        made before the index was stored gets ``choice`` (default ``auto``)."""
        self._store.init_index(choice)
        stored = self.factory
        if choice is not None and choice not in (stored, self.index_choice):
            raise ValueError(
                f"catalog {self.location} uses index {self.index_choice!r} ({stored}); rebuild "
                f"it to change to {choice!r}: vestis reindex --catalog {self.location} "
                f"--index {choice}"
            )

    @property
    def read_only(self) -> bool:
        """The catalog's files cannot be written: it was opened for reads only."""
        return self._store.read_only

    @property
    def generation(self) -> int:
        """Grows with every write to the catalog (vectors, metadata, settings), by this or
        any other process: caches of its contents key on it and are fresh while it holds."""
        return self._store.generation

    @property
    def model_name(self) -> str:
        return self._store.get_meta("model_name")

    @property
    def model_id(self) -> str:
        return self._store.get_meta("model_id")

    @property
    def dim(self) -> int:
        return self._store.dim

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index now (``index_choice`` resolved)."""
        return self._store.factory

    @property
    def index_choice(self) -> str:
        """What the user asked for: ``auto``, a preset or a factory string."""
        return self._store.index_choice

    @property
    def search_params(self) -> str:
        """FAISS search parameters applied after every load (``efSearch=128``)."""
        return self._store.search_params

    @property
    def crop_mode(self) -> str:
        """How new shop photos are cropped (see :mod:`vestis.catalog.garments`): the choice
        of the first :meth:`add`, ``auto`` by default. A catalog that stored photos before
        the choice was recorded keeps ``none``, its photos' mode."""
        stored = self._store.get_meta("crop")
        if stored:
            return stored
        return "none" if self._store.count_images() else DEFAULT_CROP

    @property
    def has_garment_groups(self) -> bool:
        """Whether some images carry a ``garment`` group (compatible-group search)."""
        return self._store.get_meta("garment_groups") == "1"

    @property
    def parser(self):
        """The garment parser used for crops and query garments, loaded on first use."""
        return self.cropper.parser

    @property
    def encoder(self) -> Encoder:
        """The catalog's own model, loaded on first use."""
        if self._encoder is None:
            encoder = Encoder.from_name(self.model_name, backend=self._backend)
            if encoder.model_id != self.model_id:
                raise ModelMismatchError(
                    f"catalog {self.location} was built with {self.model_name!r} as it was "
                    f"then ({self.model_id}); that name now loads {encoder.model_id}. Re-embed "
                    f"the catalog with it: vestis reembed --catalog {self.location}")
            self._encoder = encoder
        return self._encoder

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"vectors from model {model_id!r} cannot go into catalog {self.location}, "
                f"built with {self.model_id!r}"
            )

    # -- life cycle --------------------------------------------------------------------
    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if exc is None:
            self.close()
            return
        # The error in flight is the one to report: saving the index again on the way out
        # (after a full disk, say) must not hide it behind a second failure.
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Save the index if it changed, then close the store (also when the save fails)."""
        self._store.close()

    def __len__(self) -> int:
        return self._store.count_items()

    @property
    def num_images(self) -> int:
        return self._store.count_images()

    def info(self, *, recall_queries: int = 0) -> dict[str, Any]:
        """Counts, model and index; with ``recall_queries`` > 0 also the index's recall@10
        against exact search over that many stored vectors (see :meth:`measure_recall`).
        ``index_in_sync`` compares the ids the index holds with the store's, not counts."""
        details = {
            "path": self.location,
            "items": len(self),
            "images": self.num_images,
            "model": self.model_name,
            "model_id": self.model_id,
            "dim": self.dim,
            "index_choice": self.index_choice,
            "index": self.factory,
            "search_params": self.search_params,
            **self._store.index_info(),
            "metadata_fields": self._store.metadata_keys(),
        }
        if recall_queries > 0:
            details["recall@10_vs_flat"] = round(self.measure_recall(queries=recall_queries), 4)
        return details

    def measure_recall(self, k: int = 10, *, queries: int = 200, seed: int = 0) -> float:
        """Recall@``k`` of the index against exact (Flat) search: stored vectors, sampled
        uniformly, query the index and an exact scan of the store."""
        return self._store.measure_recall(k, queries=queries, seed=seed)

    # -- the vector index ------------------------------------------------------------
    def _vector_index(self):
        """The store's index, in step with the stored vectors."""
        return self._store._vector_index()

    def rebuild_index(self, index: str | None = None, search_params: str | None = None) -> None:
        """Rebuild the vector index from the stored vectors (no re-embedding).

        ``index`` changes the choice (``auto``, a preset or a FAISS factory string);
        ``search_params`` (``efSearch=256``, ``nprobe=32``) alone only re-tunes the index.
        """
        self._store.rebuild_index(index, search_params)

    def save(self) -> None:
        """Persist the vector index now (it is also saved after each write operation)."""
        self._store.save()


    # -- writes ----------------------------------------------------------------------
    def add(
        self,
        source: str | Path | Sequence[str | Path | ImageRecord],
        *,
        item_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        progress: bool = False,
        on_error: Callable[[str, str], None] | None = None,
        crop: str | None = None,
        runner: IngestRunner | None = None,
    ) -> IngestReport:
        """Add images from a folder, a CSV, or a list of paths or records.

        Bad images are reported in ``IngestReport.failed`` (and to ``on_error``) and the
        rest are added. Images already in the catalog for the same item are skipped.
        ``item_id`` and ``metadata`` apply to every image of a list or file source.
        ``crop``: ``auto`` indexes each photo by the garment its category names, the whole
        photo when it names none; ``garment`` the same, but the largest garment then;
        ``none`` the whole photo (see :mod:`vestis.catalog.garments`). The choice is kept
        for later adds (default: the catalog's, at first ``auto``). ``runner``: where hashing
        and embedding run (default: here; :class:`vestis.catalog.ray_ingest.RayRunner` on Ray).
        """

        started = time.perf_counter()
        crop = check_crop_mode(crop) if crop is not None else self.crop_mode
        records = unique_records(read_source(source))
        if item_id is not None or metadata:
            records = [
                replace(r, item_id=item_id or r.item_id,
                        metadata={**r.metadata, **(metadata or {})})
                for r in records
            ]
        with self._store.writing():
            self._check_model(self.encoder.model_id)
            indexer = Indexer(self._store, self.encoder, self.cropper, runner)
            report = indexer.add(records, crop, progress=progress, on_error=on_error)
        report.seconds = time.perf_counter() - started
        return report

    def add_vectors(
        self,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        *,
        model_id: str,
        paths: Sequence[str] | None = None,
        metadata: Sequence[dict[str, Any]] | None = None,
        boxes: Sequence[Box | None] | None = None,
        hashes: Sequence[str] | None = None,
    ) -> int:
        """Add precomputed embeddings; ``model_id`` must be the catalog's model id.

        ``boxes``: the box of each image the vector was embedded from, if any. ``hashes``:
        each file's :func:`content_hash` (lets a server check a file before serving it;
        default: the vector's own hash). ``paths`` may be relative to the catalog."""
        self._check_model(model_id)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} item ids for {len(vectors)} vectors")
        rows = vector_rows(item_ids, vectors, paths=paths, metadata=metadata, boxes=boxes,
                           hashes=hashes)
        with self._store.writing():
            ids = store_images(self._store, rows, model_id)
            self._store.commit()
        return sum(1 for i in ids if i != -1)

    def remove(self, item_id: str) -> int:
        """Remove an item and all its images; returns the number of images removed."""
        try:
            ids = self._store.remove_item(item_id)
        except KeyError:
            raise KeyError(f"no item {item_id!r} in catalog {self.location}") from None
        return len(ids)

    def update(self, item_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Set metadata on an item (a ``None`` value deletes the key); ``item_id`` is not
        metadata (it names the item) and is refused, as the server refuses it."""
        reserved = RESERVED_KEYS.intersection(metadata)
        if reserved:
            raise ValueError(f"metadata key {sorted(reserved)[0]!r} is reserved")
        try:
            return self._store.update_item(item_id, metadata)
        except KeyError:
            raise KeyError(f"no item {item_id!r} in catalog {self.location}") from None

    # -- reads -----------------------------------------------------------------------
    def get(self, item_id: str) -> Item:
        metadata = self._store.item_metadata(item_id)
        if metadata is None:
            raise KeyError(f"no item {item_id!r} in catalog {self.location}")
        return Item(item_id, metadata, self._store.images_of(item_id))

    def __contains__(self, item_id: str) -> bool:
        return self._store.item_metadata(item_id) is not None

    def item_ids(self) -> list[str]:
        return self._store.item_ids()

    def image_ids_where(self, where: dict[str, Any]) -> np.ndarray:
        """Ids of the images a ``where`` filter keeps (see :meth:`search`)."""
        return self._store.filtered_image_ids(where)

    def file_of(self, row: ImageRow) -> Path:
        """The file of an image row: stored paths are absolute, or relative to the catalog
        directory (server uploads), so a catalog can move and a server start anywhere."""
        return self.path / row.path

    def stored_vector_hash(self, image_id: int) -> str:
        """:func:`vector_hash` of an image's stored vector (rows added as vectors keep it)."""
        return vector_hash(self._store.vectors_by_id([image_id])[0])

    def image(self, image_id: int) -> ImageRow:
        if not 0 <= image_id < 2**63:
            raise KeyError(f"no image {image_id} in catalog {self.location}")
        rows = self._store.images_by_id([image_id])
        if image_id not in rows:
            raise KeyError(f"no image {image_id} in catalog {self.location}")
        return rows[image_id]

    def embed(self, query: ImageSource, box: Box | None = None) -> np.ndarray:
        return self.encoder.embed_one(query, box)

    def search(
        self,
        query: ImageSource | np.ndarray,
        k: int = 10,
        *,
        where: dict[str, Any] | None = None,
        box: Box | None = None,
        rerank: bool | str | Path | Matcher | None = None,
        rerank_k: int = RERANK_K,
    ) -> list[Match]:
        """The ``k`` best items for an image (path, bytes, PIL) or a query vector.

        ``where`` keeps only images whose metadata equals every given value (AND).
        Each item appears once, with its best-matching image. ``rerank`` (see
        :meth:`search_vectors`) re-orders the top ``rerank_k`` with a learned matcher.
        """
        vector = query if isinstance(query, np.ndarray) else self.embed(query, box)
        return self.search_vectors(np.atleast_2d(vector), k, where=where, rerank=rerank,
                                   rerank_k=rerank_k)[0]

    def search_garments(
        self,
        query: ImageSource,
        k: int = 10,
        *,
        garment: str | None = None,
        compatible: bool = True,
        where: dict[str, Any] | None = None,
        mask: str = "none",
        rerank: bool | str | Path | Matcher | None = None,
        rerank_k: int = RERANK_K,
    ) -> list[GarmentHits]:
        """The ``k`` best items for each garment the parser finds in a photo: ``garment``
        limits it to one group; ``compatible`` matches only compatible catalog groups;
        ``mask`` (``none``, ``grey``, ``white``) paints the crop's non-garment pixels.
        See :func:`vestis.catalog.garments.search_garments`."""
        return search_garments(self, query, k, garment=garment, compatible=compatible,
                               where=where, mask=mask, rerank=rerank, rerank_k=rerank_k)

    def search_vectors(
        self, vectors: np.ndarray, k: int = 10, *, where: dict[str, Any] | None = None,
        rerank: bool | str | Path | Matcher | None = None, rerank_k: int = RERANK_K,
    ) -> list[list[Match]]:
        """Per query vector, the ``k`` best items. ``rerank``: ``True`` (the shipped
        matcher), a matcher name, file or :class:`~vestis.models.matcher.Matcher` re-orders
        each query's top ``max(k, rerank_k)`` items by the matcher's logit on the query and
        the item's best image's stored vector (then ``score`` is that logit)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if rerank is None or rerank is False:
            hits = self._store.search_items(vectors, k, where)
            return [[_match(hit) for hit in row] for row in hits]
        matcher = load_matcher(DEFAULT_MATCHER if rerank is True else rerank)
        matcher.check(self.model_id, self.dim)
        hits = self._store.search_items(vectors, max(k, rerank_k), where)
        found = []
        for vector, row in zip(vectors, hits, strict=True):
            try:
                stored = self._store.vectors_by_id([hit.row.image_id for hit in row])
            except KeyError:  # an item removed since the search: search again without it
                row = self._store.search_items(vector[None], max(k, rerank_k), where)[0]
                stored = self._store.vectors_by_id([hit.row.image_id for hit in row])
            order, logits = matcher.rerank(vector, stored) if row else ([], [])
            found.append([dataclasses.replace(_match(row[i]), score=float(logits[i]))
                          for i in order[:k]])
        return found


def _match(hit: ItemHit) -> Match:
    row = hit.row
    return Match(row.item_id, hit.score, row.image_id, row.path,
                 {**hit.item_metadata, **row.metadata}, row.box)


def _model_reference(model: str) -> str:
    """Registry names stay names; checkpoint paths are stored absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_file() else model


def _deprecated_factory(index: str | None, factory: str | None) -> str | None:
    """``Catalog(factory=...)``, the old name of ``index=``: accepted with a warning."""
    if factory is None:
        return index
    import warnings

    warnings.warn("Catalog(factory=...) is deprecated; use Catalog(index=...)",
                  DeprecationWarning, stacklevel=3)
    if index is not None and index != factory:
        raise TypeError("Catalog() got both index= and its deprecated name factory=")
    return factory

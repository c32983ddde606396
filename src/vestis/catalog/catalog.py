"""A catalog is a directory: an SQLite store (truth) plus a vector index (a cache of it).

Crash safety: each ingest batch is one SQLite transaction, and images are unique per
(item, content hash), so re-running an interrupted ingest adds exactly what is missing.
The index file is written atomically, under the directory's write lock, and stamped with
the ``vector_epoch`` it was built from (never a later one). It is used only when its stamp
is the store's epoch and it holds exactly the stored image ids; otherwise (a crash between
commit and save, another process's writes) it is caught up or rebuilt from the store.
Every search and write first checks the epoch, so a long-running process (the server) sees
what other processes (the CLI) changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vestis.atomic import write_atomic
from vestis.catalog.garments import (
    GARMENT_KEY,
    GarmentCropper,
    GarmentHits,
    check_crop_mode,
    search_garments,
)
from vestis.catalog.index import (
    AUTO,
    TRAIN_SAMPLE,
    FaissIndex,
    VectorIndex,
    create_index,
    default_search_params,
    exact_top_k,
    is_sized,
    recall_at_k,
    resolve_factory,
)
from vestis.catalog.sources import IngestRecord, read_source, unique_records
from vestis.catalog.store import ImageRow, ModelMismatchError, NewImage, Store
from vestis.images import Box, ImageSource
from vestis.models import DEFAULT_MODEL, Encoder
from vestis.models.encoder import in_context

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

DB_NAME = "catalog.db"
INDEX_NAME = "index.faiss"
INDEX_STAMP_NAME = "index.json"
LOCK_NAME = "write.lock"
#: Keys that are not metadata: filters use ``item_id`` for the item itself.
RESERVED_KEYS = frozenset({"item_id"})


class ReadOnlyCatalogError(PermissionError):
    """A write to a catalog that can only be read (a read-only mount or files)."""


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


@dataclass
class IngestReport:
    added: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


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
        factory: str | None = None,
        encoder: Encoder | None = None,
        backend: str = "auto",
        cropper: GarmentCropper | None = None,
    ):
        """Open or create the catalog at ``path``.

        ``model``: a registered model, checkpoint or ONNX file (new catalogs; default
        ``vestis-lite0``). ``factory``: the index choice of a new catalog (``auto``, a preset
        or a FAISS factory string). ``backend``: ``auto``, ``onnx`` or ``torch`` inference.
        ``cropper``: how shop photos are cropped to their garment and categories mapped to
        garment groups (default: the shipped parser and :data:`CATEGORY_KEYWORDS`).
        """
        self.path = Path(path).expanduser()
        self._backend = backend
        self.cropper = cropper or GarmentCropper()
        if not (self.path / DB_NAME).exists():
            encoder = self._check_new(model, factory, encoder)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._write_depth = 0
        self._index: VectorIndex | None = None
        self._index_epoch: int | None = None  # the store epoch self._index reflects
        self._index_dirty = False
        self._store = Store(self.path / DB_NAME)
        self._encoder = encoder
        self._init_model(model or (encoder.name if encoder else None), factory)

    def _check_new(self, model: str | None, choice: str | None,
                   encoder: Encoder | None) -> Encoder:
        """Before a new catalog's files exist: its model loads and its index choice is a
        valid one, so a bad ``--model`` or ``--index`` leaves nothing behind."""
        encoder = encoder or Encoder.from_name(_model_reference(model or DEFAULT_MODEL),
                                               backend=self._backend)
        create_index(encoder.dim, resolve_factory(choice or AUTO, 0, encoder.dim))
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
            with self._lock, self._write_lock():
                stored = self._store.create_meta(wanted, key="model_name")
            if stored == wanted:
                self._encoder = encoder
                return
            self._encoder = self._encoder or encoder
            model = name
        self._check_stored_model(model)
        self._init_factory(choice)

    def _check_stored_model(self, model: str | None) -> None:
        stored = self._store.get_meta("model_name")
        if model is None or _model_reference(model) == stored:
            return
        candidate = self._encoder or Encoder.from_name(model, backend=self._backend)
        if candidate.model_id != self._store.get_meta("model_id"):
            raise ModelMismatchError(
                f"catalog {self.path} was built with model {stored!r} "
                f"({self._store.get_meta('model_id')}); it cannot use {model!r} "
                f"({candidate.model_id}). Use a new catalog directory for another model."
            )
        self._encoder = candidate

    def _init_factory(self, choice: str | None) -> None:
        """An existing catalog refuses another index (``rebuild_index`` changes it); one
        made before the index was stored gets ``choice`` (default ``auto``)."""
        if self._store.get_meta("factory") is None:
            choice = choice or AUTO
            factory = resolve_factory(choice, 0, self.dim)
            with self._lock, self._write_lock():
                self._store.create_meta({"index_choice": choice, "factory": factory,
                                         "search_params": default_search_params(factory)},
                                        key="factory")
        stored = self.factory
        if choice is not None and choice not in (stored, self.index_choice):
            raise ValueError(
                f"catalog {self.path} uses index {self.index_choice!r} ({stored}); rebuild it "
                f"to change to {choice!r}: vestis reindex --catalog {self.path} --index {choice}"
            )

    @property
    def read_only(self) -> bool:
        """The catalog's files cannot be written: it was opened for reads only."""
        return self._store.read_only

    @property
    def outside_changes(self) -> int:
        """A number that changes whenever another process commits to the store (metadata
        included); caches of this catalog's contents key on it."""
        return self._store.data_version

    @property
    def model_name(self) -> str:
        return self._store.get_meta("model_name")

    @property
    def model_id(self) -> str:
        return self._store.get_meta("model_id")

    @property
    def dim(self) -> int:
        return int(self._store.get_meta("dim"))

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index now (``index_choice`` resolved)."""
        return self._store.get_meta("factory")

    @property
    def index_choice(self) -> str:
        """What the user asked for: ``auto``, a preset or a factory string."""
        return self._store.get_meta("index_choice") or self.factory

    @property
    def search_params(self) -> str:
        """FAISS search parameters applied after every load (``efSearch=128``)."""
        stored = self._store.get_meta("search_params")
        return default_search_params(self.factory) if stored is None else stored

    @property
    def crop_mode(self) -> str:
        """How new shop photos are cropped: ``none`` or ``garment`` (set by :meth:`add`)."""
        return self._store.get_meta("crop") or "none"

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
            self._encoder = Encoder.from_name(self.model_name, backend=self._backend)
            self._check_model(self._encoder.model_id)
        return self._encoder

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"vectors from model {model_id!r} cannot go into catalog {self.path}, "
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
        with self._lock:
            try:
                if self._index_dirty:
                    with self._write_lock():
                        self._save_index()
            finally:
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
        with self._lock, self._store.snapshot():
            index = self._vector_index()
            in_sync = bool(np.array_equal(index.ids(), self._store.image_ids()))
        index_file = self.path / INDEX_NAME
        size = index_file.stat().st_size if index_file.exists() else 0
        details = {
            "path": str(self.path),
            "items": len(self),
            "images": self.num_images,
            "model": self.model_name,
            "model_id": self.model_id,
            "dim": self.dim,
            "index_choice": self.index_choice,
            "index": self.factory,
            "search_params": self.search_params,
            "indexed_vectors": len(index),
            "index_in_sync": in_sync,
            "index_bytes_per_vector": round(size / len(index), 1) if len(index) else 0,
            "metadata_fields": self._store.metadata_keys(),
        }
        if recall_queries > 0:
            details["recall@10_vs_flat"] = round(self.measure_recall(queries=recall_queries), 4)
        return details

    def measure_recall(self, k: int = 10, *, queries: int = 200, seed: int = 0) -> float:
        """Recall@``k`` of the index against exact (Flat) search: stored vectors, sampled
        uniformly, query the index and an exact scan of the store."""
        with self._lock:
            index = self._vector_index()
            ids = self._store.sample_image_ids(queries, seed)
            if not len(ids):
                return 1.0
            vectors = self._store.vectors_by_id(ids)
            k = min(k, len(index))
            _, exact = exact_top_k(vectors, self._store.iter_vectors(), k)
            _, found = index.search(vectors, k)
        return recall_at_k(found, exact)

    # -- the vector index ------------------------------------------------------------
    def _vector_index(self) -> VectorIndex:
        """The index, in step with the store: when another process (or catalog object) has
        changed the vectors since (a new ``vector_epoch``), it is brought up to date first."""
        with self._lock:
            if self._index is None or self._index_epoch != self._store.vector_epoch:
                self._sync_index()
            return self._index

    def _sync_index(self) -> None:
        """Bring the index to the store's vectors, read in one snapshot: the saved index
        when its stamp and ids match the store, else the index in memory with the missing
        vectors added and the removed ones taken out, else a rebuild. The index is labelled
        with the epoch of that snapshot, never a later one."""
        with self._store.snapshot():
            epoch = self._store.vector_epoch
            ids = self._store.image_ids()
            index = self._load_saved(epoch, ids)
            if index is None and self._index is not None and self._index.factory == self.factory:
                index = self._catch_up(self._index, ids)
            changed = index is None or index is self._index
            self._index = index or self._build_index()
            self._index_epoch = epoch
        if changed:
            self._save_if_free()

    def _load_saved(self, epoch: int, ids: np.ndarray) -> VectorIndex | None:
        """The saved index, if its stamp is this epoch and it holds exactly ``ids``."""
        stamp = self._read_stamp()
        index_file = self.path / INDEX_NAME
        if stamp.get("epoch") != epoch or stamp.get("factory") != self.factory \
                or not index_file.exists():
            return None
        with contextlib.suppress(RuntimeError, ValueError):
            index = FaissIndex.load(index_file, self.factory, self.search_params)
            if index.dim == self.dim and np.array_equal(index.ids(), ids):
                return index
        return None

    def _catch_up(self, index: VectorIndex, ids: np.ndarray) -> VectorIndex:
        """Add the stored vectors ``index`` lacks and remove the ids the store no longer has
        (image ids are never reused and their vectors never change)."""
        held = index.ids()
        index.remove(held[~np.isin(held, ids)])
        missing = ids[~np.isin(ids, held)]
        if len(missing):
            index.add(missing, self._store.vectors_by_id(missing))
        return index

    def _build_index(self) -> VectorIndex:
        """Build the index from the stored vectors: train on a sample, then add them all."""
        index = create_index(self.dim, self.factory, self.search_params)
        need = index.training_size() if isinstance(index, FaissIndex) else 0
        if need > 1 and self._store.count_images() >= need:
            sample = self._store.sample_image_ids(max(TRAIN_SAMPLE, need))
            index.train(self._store.vectors_by_id(sample))
        for ids, vectors in self._store.iter_vectors(batch=16384):
            index.add(ids, vectors)
        return index

    def _rebuild_index(self) -> VectorIndex:
        """Rebuild from the store and save (the caller holds the write lock)."""
        with self._store.snapshot():
            epoch = self._store.vector_epoch
            self._index = self._build_index()
            self._index_epoch = epoch
        self._save_index()
        return self._index

    def _wrote(self) -> None:
        """After this catalog's own change to the store, under the write lock: the index
        was in step before it (see :meth:`_vector_index`) and took the same change, and no
        other process writes while the lock is held, so it reflects the epoch now."""
        self._index_epoch = self._store.vector_epoch
        self._index_dirty = True

    def rebuild_index(self, index: str | None = None, search_params: str | None = None) -> None:
        """Rebuild the vector index from the stored vectors (no re-embedding).

        ``index`` changes the choice (``auto``, a preset or a FAISS factory string);
        ``search_params`` (``efSearch=256``, ``nprobe=32``) alone only re-tunes the index.
        """
        with self._lock, self._write_lock():
            choice = index or self.index_choice
            factory = resolve_factory(choice, self._store.count_images(), self.dim)
            if factory == self.factory and index is None and search_params is not None:
                self._tune(search_params)
                return
            params = default_search_params(factory) if search_params is None else search_params
            create_index(self.dim, factory, params)  # a bad string fails before anything changes
            self._store.set_meta({"index_choice": choice, "factory": factory,
                                  "search_params": params})
            self._rebuild_index()

    def _tune(self, search_params: str) -> None:
        index = self._vector_index()
        index.set_search_params(search_params)
        self._store.set_meta({"search_params": search_params})
        self._save_index()

    def _follow_size(self) -> None:
        """A size-dependent choice (``auto``, ``ivfpq``) moves to the factory its catalog has
        grown (or shrunk) into, rebuilding from the stored vectors."""
        if not is_sized(self.index_choice):
            return
        factory = resolve_factory(self.index_choice, self._store.count_images(), self.dim)
        if factory != self.factory:
            self._store.set_meta({"factory": factory,
                                  "search_params": default_search_params(factory)})
            self._rebuild_index()

    def _read_stamp(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / INDEX_STAMP_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _save_index(self) -> None:
        """Write the index, then the stamp that vouches for it: the epoch the index was
        brought to (never the store's epoch read now). The caller holds the write lock, so
        two processes never interleave the two files."""
        self._remove_stale_tmp()
        self._index.save(self.path / INDEX_NAME)
        stamp = {"epoch": self._index_epoch, "count": len(self._index), "factory": self.factory}
        write_atomic(self.path / INDEX_STAMP_NAME, json.dumps(stamp))
        self._index_dirty = False

    def _remove_stale_tmp(self) -> None:
        """Temporary files left by a killed process: the index's (written only under the
        write lock, which this process holds) at once; others (server uploads, feature
        caches, written outside it) once they are an hour old."""
        now = time.time()
        for pattern, max_age in [(f".{INDEX_NAME}*.tmp", 0.0), (f".{INDEX_STAMP_NAME}*.tmp", 0.0),
                                 ("uploads/.*.tmp", 3600.0), ("*.tmp.npz", 3600.0)]:
            for tmp in self.path.glob(pattern):
                with contextlib.suppress(OSError):
                    if now - tmp.stat().st_mtime >= max_age:
                        tmp.unlink()

    def _save_if_free(self) -> None:
        """Save an index a read brought up to date, if no other process is writing (the
        writer saves its own) and the store has not moved on meanwhile."""
        with self._write_lock(blocking=False) as locked:
            if locked and self._index_epoch == self._store.vector_epoch:
                self._save_index()

    def save(self) -> None:
        """Persist the vector index now (it is also saved after each write operation)."""
        with self._lock, self._write_lock():
            if self._index is not None:
                self._vector_index()
                self._save_index()

    @contextlib.contextmanager
    def _write_lock(self, blocking: bool = True) -> Iterator[bool]:
        """One writing process at a time per catalog directory; yields whether it is held
        (always, when ``blocking``). Re-entrant within this catalog; taken under
        ``self._lock``."""
        if self.read_only:
            if blocking:
                raise ReadOnlyCatalogError(f"catalog {self.path} is read-only: it can be "
                                           "searched but not changed")
            yield False
            return
        if self._write_depth:
            self._write_depth += 1
            try:
                yield True
            finally:
                self._write_depth -= 1
            return
        with open(self.path / LOCK_NAME, "a") as handle:
            if not _flock(handle, blocking):
                yield False
                return
            self._write_depth = 1
            try:
                yield True
            finally:
                self._write_depth = 0
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # -- writes ----------------------------------------------------------------------
    def add(
        self,
        source: str | Path | Sequence[str | Path | IngestRecord],
        *,
        item_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        progress: bool = False,
        on_error: Callable[[str, str], None] | None = None,
        crop: str | None = None,
    ) -> IngestReport:
        """Add images from a folder, a CSV, or a list of paths or records.

        Bad images are reported in ``IngestReport.failed`` (and to ``on_error``) and the
        rest are added. Images already in the catalog for the same item are skipped.
        ``item_id`` and ``metadata`` apply to every image of a list or file source.
        ``crop``: ``garment`` indexes each photo by the garment its category names (see
        :mod:`vestis.catalog.garments`), ``none`` by the whole photo; the choice is kept
        for later adds (default: the catalog's, at first ``none``).
        """

        started = time.perf_counter()
        crop = check_crop_mode(crop) if crop is not None else self.crop_mode
        records = unique_records(read_source(source))
        if item_id is not None or metadata:
            records = [
                IngestRecord(
                    r.path, item_id or r.item_id, {**r.metadata, **(metadata or {})}, r.box
                )
                for r in records
            ]
        report = IngestReport()
        with self._lock, self._write_lock():
            self._check_model(self.encoder.model_id)
            hashed = self._hash_records(records, report, on_error, progress)
            known = self._store.known_hashes((r.item_id, sha) for r, sha in hashed)
            todo = [(r, sha) for r, sha in hashed if (r.item_id, sha) not in known]
            report.skipped = len(hashed) - len(todo)
            located = self._locate_garments(todo, crop, progress)
            parsed_box = [new.box is not None and old.box is None
                          for (new, _), (old, _) in zip(located, todo, strict=True)]
            if crop != self.crop_mode:
                self._store.set_meta({"crop": crop})
            self._embed_and_store(located, report, on_error, progress, parsed_box)
            if report.added:
                self._follow_size()
            if self._index_dirty:
                self._save_index()
        report.seconds = time.perf_counter() - started
        return report

    def _locate_garments(self, todo, crop: str, progress: bool) -> list[tuple[IngestRecord, str]]:
        """Each record's garment group and, with ``crop="garment"``, its garment's box. The
        content hash stays the one of the photo as given, so a re-run skips it unparsed."""
        records = [record for record, _ in todo]
        if crop == "garment":
            records = self.cropper.crop(records, progress=progress)
        else:
            records = self.cropper.label(records)
        if any(GARMENT_KEY in r.metadata for r in records) and not self.has_garment_groups:
            self._store.set_meta({"garment_groups": "1"})
        return [(record, sha) for record, (_, sha) in zip(records, todo, strict=True)]

    def _hash_records(self, records, report, on_error, progress) -> list[tuple[IngestRecord, str]]:
        def digest(record: IngestRecord) -> tuple[IngestRecord, str | None, str | None]:
            try:
                data = Path(record.path).read_bytes()
            except OSError as exc:
                return record, None, f"cannot be read ({exc.strerror or exc})"
            if not data:
                return record, None, "empty file (0 bytes)"
            return record, content_hash(data, record.box), None

        hashed, seen = [], set()
        with ThreadPoolExecutor(4) as pool:
            results = pool.map(digest, records)
            bar = tqdm(
                results, total=len(records), desc="hashing", unit="img", disable=not progress
            )
            for record, sha, error in bar:
                if error:
                    self._fail(report, on_error, str(record.path), error)
                elif (record.item_id, sha) not in seen:
                    seen.add((record.item_id, sha))
                    hashed.append((record, sha))
        return hashed

    @staticmethod
    def _fail(report: IngestReport, on_error, path: str, reason: str) -> None:
        report.failed.append((path, reason))
        if on_error is not None:
            on_error(path, reason)

    def _embed_and_store(self, todo, report, on_error, progress, parsed_box=None) -> None:
        """Embed and store ``todo``; rows flagged ``parsed_box`` (boxes found by the garment
        parser) get :meth:`Encoder.embed_in_context` vectors, the others their box's own."""
        if not todo:
            return
        index = self._vector_index()
        paths = [record.path for record, _ in todo]
        parsed_box = parsed_box or [False] * len(todo)
        boxes = [None if context else record.box
                 for (record, _), context in zip(todo, parsed_box, strict=True)]
        for batch in self.encoder.iter_batches(paths, boxes, progress=progress, desc="indexing"):
            for position, error in batch.errors:
                self._fail(report, on_error, str(paths[position]), error.reason)
            if not batch.indices:
                continue
            self._add_context(batch, todo, parsed_box)
            new_images, item_metadata = [], {}
            for position, vector in zip(batch.indices, batch.vectors, strict=False):
                record, sha = todo[position]
                new_images.append(
                    NewImage(
                        record.item_id, str(record.path), sha, vector, record.metadata, record.box
                    )
                )
                item_metadata.setdefault(record.item_id, {}).update(record.metadata)
            ids = self._store.add_images(new_images, item_metadata,
                                         model_id=self.encoder.model_id)
            added = [(i, v) for i, v in zip(ids, batch.vectors, strict=False) if i != -1]
            if added:
                index.add(np.array([i for i, _ in added]), np.stack([v for _, v in added]))
            self._wrote()
            report.added += len(added)
            report.skipped += len(ids) - len(added)

    def _add_context(self, batch, todo, parsed_box) -> None:
        """Fuse the whole-photo vectors of a batch's parser-boxed rows with their crops'."""
        rows = [n for n, position in enumerate(batch.indices) if parsed_box[position]]
        if not rows:
            return
        crops = self.encoder.embed([todo[batch.indices[n]][0].path for n in rows],
                                   [todo[batch.indices[n]][0].box for n in rows])
        batch.vectors[rows] = in_context(batch.vectors[rows], crops)

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
        paths = paths or [""] * len(vectors)
        metadata = metadata or [{} for _ in vectors]
        boxes = boxes or [None] * len(vectors)
        hashes = hashes or [vector_hash(vector) for vector in vectors]
        new_images, item_metadata = [], {}
        rows = zip(item_ids, vectors, paths, metadata, boxes, hashes, strict=False)
        for item_id, vector, path, meta, box, sha in rows:
            new_images.append(NewImage(str(item_id), str(path), sha, vector, dict(meta), box))
            item_metadata.setdefault(str(item_id), {}).update(meta)
        with self._lock, self._write_lock():
            index = self._vector_index()
            ids = self._store.add_images(new_images, item_metadata, model_id=model_id)
            if any(GARMENT_KEY in meta for meta in metadata) and not self.has_garment_groups:
                self._store.set_meta({"garment_groups": "1"})
            keep = [n for n, i in enumerate(ids) if i != -1]
            if keep:
                index.add(np.array([ids[n] for n in keep]), vectors[keep])
                self._wrote()
                self._save_index()
                self._follow_size()
        return len(keep)

    def remove(self, item_id: str) -> int:
        """Remove an item and all its images; returns the number of images removed."""
        with self._lock, self._write_lock():
            index = self._vector_index()
            try:
                ids = self._store.remove_item(item_id)
            except KeyError:
                raise KeyError(f"no item {item_id!r} in catalog {self.path}") from None
            index.remove(np.array(ids, dtype=np.int64))
            self._wrote()
            self._save_index()
            if getattr(index, "needs_compaction", False):
                self._rebuild_index()
        return len(ids)

    def update(self, item_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Set metadata on an item (a ``None`` value deletes the key); ``item_id`` is not
        metadata (it names the item) and is refused, as the server refuses it."""
        reserved = RESERVED_KEYS.intersection(metadata)
        if reserved:
            raise ValueError(f"metadata key {sorted(reserved)[0]!r} is reserved")
        with self._lock, self._write_lock():
            try:
                return self._store.update_item(item_id, metadata)
            except KeyError:
                raise KeyError(f"no item {item_id!r} in catalog {self.path}") from None

    # -- reads -----------------------------------------------------------------------
    def get(self, item_id: str) -> Item:
        metadata = self._store.item_metadata(item_id)
        if metadata is None:
            raise KeyError(f"no item {item_id!r} in catalog {self.path}")
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
            raise KeyError(f"no image {image_id} in catalog {self.path}")
        rows = self._store.images_by_id([image_id])
        if image_id not in rows:
            raise KeyError(f"no image {image_id} in catalog {self.path}")
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
    ) -> list[Match]:
        """The ``k`` best items for an image (path, bytes, PIL) or a query vector.

        ``where`` keeps only images whose metadata equals every given value (AND).
        Each item appears once, with its best-matching image.
        """
        vector = query if isinstance(query, np.ndarray) else self.embed(query, box)
        return self.search_vectors(np.atleast_2d(vector), k, where=where)[0]

    def search_garments(
        self,
        query: ImageSource,
        k: int = 10,
        *,
        garment: str | None = None,
        compatible: bool = True,
        where: dict[str, Any] | None = None,
        mask: str = "none",
    ) -> list[GarmentHits]:
        """The ``k`` best items for each garment the parser finds in a photo: ``garment``
        limits it to one group; ``compatible`` matches only compatible catalog groups;
        ``mask`` (``none``, ``grey``, ``white``) paints the crop's non-garment pixels.
        See :func:`vestis.catalog.garments.search_garments`."""
        return search_garments(self, query, k, garment=garment, compatible=compatible,
                               where=where, mask=mask)

    def search_vectors(
        self, vectors: np.ndarray, k: int = 10, *, where: dict[str, Any] | None = None
    ) -> list[list[Match]]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {vectors.shape}")
        with self._lock:
            index = self._vector_index()
            allowed = self._store.filtered_image_ids(where) if where else None
            if allowed is not None and not len(allowed):
                return [[] for _ in vectors]
            available = len(index) if allowed is None else len(allowed)
            return [self._top_items(index, row, k, allowed, available) for row in vectors]

    def _top_items(self, index, vector, k, allowed, available) -> list[Match]:
        # Items have several images: widen the image search until k distinct items appear.
        fetch = min(available, k * 4)
        while True:
            scores, ids = index.search(vector[None], fetch, allowed)
            best: dict[str, tuple[float, int]] = {}
            hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=False) if i != -1]
            rows = self._store.images_by_id([i for _, i in hits])
            for score, image_id in hits:
                row = rows.get(image_id)
                if row is not None and row.item_id not in best:
                    best[row.item_id] = (score, image_id)
            if len(best) >= k or fetch >= available:
                break
            fetch = min(available, fetch * 4)
        return [self._match(rows[i], score) for score, i in list(best.values())[:k]]

    def _match(self, row: ImageRow, score: float) -> Match:
        metadata = {**(self._store.item_metadata(row.item_id) or {}), **row.metadata}
        return Match(row.item_id, score, row.image_id, row.path, metadata, row.box)


def _flock(handle, blocking: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _model_reference(model: str) -> str:
    """Registry names stay names; checkpoint paths are stored absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_file() else model


def vector_hash(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


def content_hash(data: bytes, box: Box | None = None) -> str:
    """The hash an image row keeps of its file's bytes (and its box, when it has one)."""
    digest = hashlib.sha256(data)
    if box is not None:
        digest.update(repr(tuple(box)).encode())
    return digest.hexdigest()

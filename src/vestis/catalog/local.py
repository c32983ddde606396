"""The local catalog store: a directory with an SQLite store (truth) and a FAISS index (a
cache of it), one writing process at a time.

Crash safety: each write is one SQLite transaction. The index file is written atomically,
under the directory's write lock, and stamped with the ``vector_epoch`` it was built from
(never a later one). It is used only when its stamp is the store's epoch and it holds
exactly the stored image ids; otherwise (a crash between commit and save, another
process's writes) it is caught up or rebuilt from the store. Every search and write first
checks the epoch, so a long-running process (the server) sees what other processes (the
CLI) changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vestis.atomic import write_atomic
from vestis.catalog.backend import ItemHit, ReadOnlyCatalogError
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
from vestis.catalog.store import VECTOR_BATCH, ImageRow, NewImage, Store

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

DB_NAME = "catalog.db"
INDEX_NAME = "index.faiss"
INDEX_STAMP_NAME = "index.json"
LOCK_NAME = "write.lock"
#: Sibling a catalog directory is renamed to while another takes its place (two-rename swap,
#: where the atomic exchange is unavailable; :mod:`vestis.catalog.reembed`).
OLD_MARK = ".old-"
#: Items have several images: a search for k items fetches k x this many images, then this
#: many times more, until k distinct items are found (or the index is exhausted).
ITEM_SEARCH_WIDENING = 4


class CatalogReplacedError(ValueError):
    """The catalog directory was replaced (``vestis adapt --catalog``) after this process
    opened it: its writes would reach the new catalog's files; open the catalog again."""


class LocalStore:
    """:class:`vestis.catalog.backend.CatalogStore` on SQLite + FAISS in ``path``.

    Thread-safe: ``lock`` serialises this object's index and store access; the directory's
    ``write.lock`` serialises writing processes (:meth:`writing`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._write_depth = 0
        self._index: VectorIndex | None = None
        self._index_epoch: int | None = None  # the store epoch self._index reflects
        self._index_dirty = False
        self._added = False
        self._sql = Store(self.path / DB_NAME)
        self._db_file = _file_identity(self.path / DB_NAME)

    @property
    def replaced(self) -> bool:
        """Whether ``catalog.db`` in the directory is no longer the file this store opened
        (another catalog was swapped in its place)."""
        return _file_identity(self.path / DB_NAME) != self._db_file

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / DB_NAME).exists()

    @property
    def read_only(self) -> bool:
        return self._sql.read_only

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        return self._sql.get_meta(key, default)

    def set_meta(self, values: dict[str, str]) -> None:
        with self.writing():
            self._sql.set_meta(values)

    def create_meta(self, values: dict[str, str], key: str) -> dict[str, str]:
        with self.writing():
            return self._sql.create_meta(values, key)

    @property
    def generation(self) -> int:
        return self._sql.generation

    @property
    def dim(self) -> int:
        return int(self._sql.get_meta("dim"))

    @property
    def factory(self) -> str:
        return self._sql.get_meta("factory")

    @property
    def index_choice(self) -> str:
        return self._sql.get_meta("index_choice") or self.factory

    @property
    def search_params(self) -> str:
        stored = self._sql.get_meta("search_params")
        return default_search_params(self.factory) if stored is None else stored

    def snapshot(self):
        return self._sql.snapshot()

    # -- reads -------------------------------------------------------------------------
    def count_items(self) -> int:
        return self._sql.count_items()

    def count_images(self) -> int:
        return self._sql.count_images()

    def known_hashes(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        return self._sql.known_hashes(pairs)

    def item_ids(self) -> list[str]:
        return self._sql.item_ids()

    def item_metadata(self, item_id: str) -> dict[str, Any] | None:
        return self._sql.item_metadata(item_id)

    def images_of(self, item_id: str) -> list[ImageRow]:
        return self._sql.images_of(item_id)

    def images_by_id(self, image_ids: Sequence[int]) -> dict[int, ImageRow]:
        return self._sql.images_by_id(image_ids)

    def image_ids(self) -> np.ndarray:
        return self._sql.image_ids()

    def iter_vectors(self, batch: int = VECTOR_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._sql.iter_vectors(batch)

    def vectors_by_id(self, image_ids: Sequence[int], batch: int = VECTOR_BATCH) -> np.ndarray:
        return self._sql.vectors_by_id(image_ids, batch)

    def sample_image_ids(self, limit: int, seed: int = 0) -> np.ndarray:
        return self._sql.sample_image_ids(limit, seed)

    def filtered_image_ids(self, where: dict[str, Any]) -> np.ndarray:
        return self._sql.filtered_image_ids(where)

    def metadata_keys(self) -> list[str]:
        return self._sql.metadata_keys()

    def search_items(self, vectors: np.ndarray, k: int,
                     where: dict[str, Any] | None = None) -> list[list[ItemHit]]:
        with self.lock:
            index = self._vector_index()
            allowed = self._sql.filtered_image_ids(where) if where else None
            if allowed is not None and not len(allowed):
                return [[] for _ in vectors]
            available = len(index) if allowed is None else len(allowed)
            return [self._top_items(index, row, k, allowed, available) for row in vectors]

    def _top_items(self, index, vector, k, allowed, available) -> list[ItemHit]:
        # Items have several images: widen the image search until k distinct items appear.
        fetch = min(available, k * ITEM_SEARCH_WIDENING)
        while True:
            scores, ids = index.search(vector[None], fetch, allowed)
            best: dict[str, tuple[float, int]] = {}
            hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=False) if i != -1]
            rows = self._sql.images_by_id([i for _, i in hits])
            for score, image_id in hits:
                row = rows.get(image_id)
                if row is not None and row.item_id not in best:
                    best[row.item_id] = (score, image_id)
            if len(best) >= k or fetch >= available:
                break
            fetch = min(available, fetch * ITEM_SEARCH_WIDENING)
        return [ItemHit(score, rows[i], self._sql.item_metadata(rows[i].item_id) or {})
                for score, i in list(best.values())[:k]]

    def index_info(self) -> dict[str, Any]:
        """The index's size, whether it holds exactly the stored ids, and bytes per vector."""
        with self.lock, self._sql.snapshot():
            index = self._vector_index()
            in_sync = bool(np.array_equal(index.ids(), self._sql.image_ids()))
        index_file = self.path / INDEX_NAME
        size = index_file.stat().st_size if index_file.exists() else 0
        return {"indexed_vectors": len(index), "index_in_sync": in_sync,
                "index_bytes_per_vector": round(size / len(index), 1) if len(index) else 0}

    def measure_recall(self, k: int = 10, *, queries: int = 200, seed: int = 0) -> float:
        """Recall@``k`` of the index against exact (Flat) search: stored vectors, sampled
        uniformly, query the index and an exact scan of the store."""
        with self.lock:
            index = self._vector_index()
            ids = self._sql.sample_image_ids(queries, seed)
            if not len(ids):
                return 1.0
            vectors = self._sql.vectors_by_id(ids)
            k = min(k, len(index))
            _, exact = exact_top_k(vectors, self._sql.iter_vectors(), k)
            _, found = index.search(vectors, k)
        return recall_at_k(found, exact)

    # -- writes ------------------------------------------------------------------------
    def add_images(self, images: Sequence[NewImage], item_metadata: dict[str, dict], *,
                   model_id: str | None = None) -> list[int]:
        """Rows and vectors in one transaction, then into the index (saved by
        :meth:`commit`)."""
        with self.writing():
            index = self._vector_index()
            ids = self._sql.add_images(images, item_metadata, model_id=model_id)
            keep = [n for n, i in enumerate(ids) if i != -1]
            if keep:
                vectors = np.stack([np.asarray(images[n].vector, dtype=np.float32)
                                    for n in keep])
                index.add(np.array([ids[n] for n in keep]), vectors)
                self._added = True
                self._wrote()
        return ids

    def commit(self) -> None:
        """After adds: a size-dependent index choice follows the catalog's size, and the
        index is saved if it changed."""
        with self.writing():
            if self._added:
                self._added = False
                self._follow_size()
            if self._index_dirty:
                self._save_index()

    def remove_item(self, item_id: str) -> list[int]:
        with self.writing():
            index = self._vector_index()
            ids = self._sql.remove_item(item_id)
            index.remove(np.array(ids, dtype=np.int64))
            self._wrote()
            self._save_index()
            if index.needs_compaction:
                self._rebuild_index()
        return ids

    def update_item(self, item_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        with self.writing():
            return self._sql.update_item(item_id, metadata)

    def close(self) -> None:
        """Save the index if it changed, then close the store (also when the save fails)."""
        with self.lock:
            try:
                if self._index_dirty:
                    with self.writing():
                        self._save_index()
            finally:
                self._sql.close()

    # -- the vector index ------------------------------------------------------------
    def _vector_index(self) -> VectorIndex:
        """The index, in step with the store: when another process (or store object) has
        changed the vectors since (a new ``vector_epoch``), it is brought up to date first."""
        with self.lock:
            if self._index is None or self._index_epoch != self._sql.vector_epoch:
                self._sync_index()
            return self._index

    def _sync_index(self) -> None:
        """Bring the index to the store's vectors, read in one snapshot: the saved index
        when its stamp and ids match the store, else the index in memory with the missing
        vectors added and the removed ones taken out, else a rebuild. The index is labelled
        with the epoch of that snapshot, never a later one."""
        with self._sql.snapshot():
            epoch = self._sql.vector_epoch
            ids = self._sql.image_ids()
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
                or not index_file.exists() or self.replaced:
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
            index.add(missing, self._sql.vectors_by_id(missing))
        return index

    def _build_index(self) -> VectorIndex:
        """Build the index from the stored vectors: train on a sample, then add them all."""
        index = create_index(self.dim, self.factory, self.search_params)
        need = index.training_size() if isinstance(index, FaissIndex) else 0
        if need > 1 and self._sql.count_images() >= need:
            sample = self._sql.sample_image_ids(max(TRAIN_SAMPLE, need))
            index.train(self._sql.vectors_by_id(sample))
        for ids, vectors in self._sql.iter_vectors(batch=16384):
            index.add(ids, vectors)
        return index

    def _rebuild_index(self) -> VectorIndex:
        """Rebuild from the store and save (the caller holds the write lock)."""
        with self._sql.snapshot():
            epoch = self._sql.vector_epoch
            self._index = self._build_index()
            self._index_epoch = epoch
        self._save_index()
        return self._index

    def _wrote(self) -> None:
        """After this object's own change to the store, under the write lock: the index
        was in step before it (see :meth:`_vector_index`) and took the same change, and no
        other process writes while the lock is held, so it reflects the epoch now."""
        self._index_epoch = self._sql.vector_epoch
        self._index_dirty = True

    def init_index(self, choice: str | None) -> None:
        """A catalog made before the index was stored gets ``choice`` (default ``auto``)."""
        if self._sql.get_meta("factory") is None:
            choice = choice or AUTO
            factory = resolve_factory(choice, 0, self.dim)
            self.create_meta({"index_choice": choice, "factory": factory,
                              "search_params": default_search_params(factory)}, key="factory")

    def rebuild_index(self, index: str | None = None, search_params: str | None = None) -> None:
        """Rebuild the vector index from the stored vectors (no re-embedding).

        ``index`` changes the choice (``auto``, a preset or a FAISS factory string);
        ``search_params`` (``efSearch=256``, ``nprobe=32``) alone only re-tunes the index.
        """
        with self.writing():
            choice = index or self.index_choice
            factory = resolve_factory(choice, self._sql.count_images(), self.dim)
            if factory == self.factory and index is None and search_params is not None:
                self._tune(search_params)
                return
            params = default_search_params(factory) if search_params is None else search_params
            create_index(self.dim, factory, params)  # a bad string fails before anything changes
            self._sql.set_meta({"index_choice": choice, "factory": factory,
                                "search_params": params})
            self._rebuild_index()

    def _tune(self, search_params: str) -> None:
        index = self._vector_index()
        index.set_search_params(search_params)
        self._sql.set_meta({"search_params": search_params})
        self._save_index()

    def _follow_size(self) -> None:
        """A size-dependent choice (``auto``, ``ivfpq``) moves to the factory its catalog has
        grown (or shrunk) into, rebuilding from the stored vectors."""
        if not is_sized(self.index_choice):
            return
        factory = resolve_factory(self.index_choice, self._sql.count_images(), self.dim)
        if factory != self.factory:
            self._sql.set_meta({"factory": factory,
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
        with self._file_lock(blocking=False) as locked:
            if locked and self._index_epoch == self._sql.vector_epoch:
                self._save_index()

    def save(self) -> None:
        """Persist the vector index now (it is also saved after each write operation)."""
        with self.writing():
            if self._index is not None:
                self._vector_index()
                self._save_index()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """This object's lock and the directory's write lock (re-entrant);
        ReadOnlyCatalogError when the store is read-only."""
        with self.lock, self._file_lock():
            yield

    @contextlib.contextmanager
    def _file_lock(self, blocking: bool = True) -> Iterator[bool]:
        """One writing process at a time per catalog directory; yields whether it is held
        (always, when ``blocking``). Re-entrant within this object; taken under
        ``self.lock``."""
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
                if self.replaced:  # the files by this path are another catalog's now
                    if blocking:
                        raise CatalogReplacedError(
                            f"catalog {self.path} was replaced by another process (vestis "
                            "adapt --catalog) since it was opened here; open it again")
                    yield False
                    return
                yield True
            finally:
                self._write_depth = 0
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def recover_swap(path: str | Path) -> None:
    """After a crash between the two renames of a directory swap (see
    :func:`vestis.catalog.reembed.exchange`): no catalog at ``path``, the old one beside it
    as ``NAME.old-PID``: put it back."""
    path = Path(path).expanduser()
    if path.exists():
        return
    for old in sorted(path.parent.glob(f"{path.name}{OLD_MARK}*")):
        if (old / DB_NAME).exists():
            with contextlib.suppress(OSError):
                os.rename(old, path)
            return


def _flock(handle, blocking: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True

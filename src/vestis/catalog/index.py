"""The vector index behind a small interface, so another engine can stand in for FAISS.

Vectors are L2-normalised, so inner product is cosine similarity. Ids are int64 image ids
owned by the catalog's store.

An index is chosen by an *index choice*: ``auto`` (by catalog size, see
:func:`auto_factory`), a preset (``flat``, ``fp16``, ``hnsw``, ``hnsw-fp16``, ``ivfpq``) or
any FAISS factory string. It is given as ``--index`` on the command line and ``index=`` in
the API, and stored (meta key and ``Catalog.index_choice``) as ``index_choice``.
:func:`resolve_factory` turns a choice and a catalog size into the concrete FAISS *factory
string* the catalog stores (meta key and ``Catalog.factory``: ``factory``). Search
parameters (``efSearch=128``, ``nprobe=32``) are applied at build and again after every load.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from vestis._env import quiet_openmp
from vestis.atomic import atomic_path

quiet_openmp()  # before FAISS starts its OpenMP runtime (see vestis._env)

import faiss  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_FACTORY = "Flat"
AUTO = "auto"
#: ``auto``: exact search below this many vectors ...
FLAT_LIMIT = 50_000
#: ... HNSW graphs below this many, and IVF-PQ beyond.
HNSW_LIMIT = 5_000_000
#: HNSW neighbours per node, and the search breadth (recall@10 >= 0.95 at 1M, BENCHMARKS.md).
HNSW_M = 32
HNSW_EF_SEARCH = 128
#: Largest PQ code, in bytes per vector (IVF-PQ is the compressed choice): with 8-bit codes
#: this keeps a vector under 600 bytes with its id and list overhead.
PQ_MAX_BYTES = 512
#: Vectors used to train IVF and PQ quantisers (a uniform sample of the catalog's own).
TRAIN_SAMPLE = 65_536
#: Searches of fewer queries than this run on one thread: parallel regions cost more than
#: they save for a single query.
SMALL_BATCH = 16
PRESETS = {"flat": "Flat", "fp16": "SQfp16", "hnsw": f"HNSW{HNSW_M}",
           "hnsw-fp16": f"HNSW{HNSW_M},SQfp16"}
SIZED_PRESETS = ("ivfpq",)


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: a power of two near 4 sqrt(n), 39+ vectors each."""
    target = max(1.0, min(4 * math.sqrt(max(n, 1)), n / 39))
    return max(1, 2 ** int(math.log2(target)))


def pq_bytes(dim: int) -> int:
    """PQ sub-quantisers for ``dim``: the largest divisor of ``dim`` up to
    :data:`PQ_MAX_BYTES` (each stores one byte per vector), so one per dimension when the
    dimension allows. Coarser codes cost recall: 95 bytes for the 285-d trained vectors lost
    0.02-0.04 of held-out Luma R@10 against Flat, 285 bytes lost nothing; 313 bytes for the
    1565-d default reach recall@10 0.87 on synthetic vectors (BENCHMARKS.md)."""
    limit = min(dim, PQ_MAX_BYTES)
    return max((m for m in range(1, limit + 1) if dim % m == 0), default=1)


def ivfpq_factory(n: int, dim: int) -> str:
    m = pq_bytes(dim)
    code = f"PQ{m}" if m >= 8 else "SQ8"  # awkward (near-prime) dims fall back to 8-bit SQ
    return f"IVF{ivf_lists(n)},{code}"


def auto_factory(n: int, dim: int) -> str:
    """The automatic choice for ``n`` vectors: Flat, then HNSW32, then IVF-PQ."""
    if n < FLAT_LIMIT:
        return "Flat"
    if n < HNSW_LIMIT:
        return PRESETS["hnsw"]
    return ivfpq_factory(n, dim)


def resolve_factory(choice: str, n: int, dim: int) -> str:
    """The concrete FAISS factory string for ``choice`` with ``n`` vectors of ``dim``."""
    key = choice.strip().lower()
    if key == AUTO:
        return auto_factory(n, dim)
    if key == "ivfpq":
        return ivfpq_factory(n, dim)
    return PRESETS.get(key, choice.strip())


def is_sized(choice: str) -> bool:
    """Whether ``choice`` depends on the catalog size (so it may change as it grows)."""
    return choice.strip().lower() in (AUTO, *SIZED_PRESETS)


def default_search_params(factory: str, n: int = 0) -> str:
    """Search parameters for a factory: HNSW's efSearch, IVF's nprobe (1/16 of the lists,
    8 to 64); empty for exact indexes."""
    if factory.startswith("HNSW"):
        return f"efSearch={HNSW_EF_SEARCH}"
    if factory.startswith("IVF"):
        lists = int(factory[3:].split(",")[0].split("_")[0])
        return f"nprobe={min(lists, max(8, min(64, lists // 16)))}"
    return ""


@runtime_checkable
class VectorIndex(Protocol):
    """What the catalog needs from a vector index."""

    dim: int
    factory: str

    @property
    def needs_compaction(self) -> bool:
        """Removed ids weigh on the index enough that it should be rebuilt."""
        ...

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def ids(self) -> np.ndarray:
        """The ids it holds (removed ones excluded), ascending."""
        ...

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query row; missing results have id -1."""
        ...

    def save(self, path: Path) -> None: ...


class FaissIndex:
    """A FAISS index built from a factory string (``"Flat"``, ``"HNSW32"``, ``"IVF256,PQ32"``).

    IVF indexes keep the image ids in their lists; others are wrapped in ``IndexIDMap2``.
    Indexes that need training (IVF, PQ) hold added vectors aside, searched exactly, until
    :meth:`training_size` of them have arrived, then train on them; :meth:`train` trains
    earlier on a chosen sample. HNSW graphs cannot delete: removed ids are tombstones,
    skipped by searches and saved next to the index, until a rebuild compacts them.
    """

    def __init__(self, dim: int, factory: str = DEFAULT_FACTORY, search_params: str = ""):
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.factory = factory
        try:
            inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {exc}") from None
        _quick_pq_training(faiss.downcast_index(inner))
        self._setup(inner if _is_ivf(inner) else faiss.IndexIDMap2(inner), search_params)
        self._staged_ids: list[np.ndarray] = []
        self._staged: list[np.ndarray] = []

    def _setup(self, index: faiss.Index, search_params: str) -> None:
        self._index = index
        self._deleted: set[int] = set()
        self._staged_ids, self._staged = [], []
        self.search_params = ""
        self.set_search_params(search_params)

    # -- parameters ----------------------------------------------------------------
    @property
    def core(self) -> faiss.Index:
        """The FAISS index under the id map, downcast (IndexHNSWFlat, IndexIVFPQ, ...)."""
        inner = self._index.index if isinstance(self._index, faiss.IndexIDMap2) else self._index
        return faiss.downcast_index(inner)

    def set_search_params(self, params: str) -> None:
        """Apply ``"efSearch=128"``, ``"nprobe=16"`` (comma-separated; empty: none)."""
        params = (params or "").strip()
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(self.core, params)
            except RuntimeError as exc:
                raise ValueError(f"invalid search parameters {params!r} for "
                                 f"{self.factory!r}: {exc}") from None
        self.search_params = params

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def is_hnsw(self) -> bool:
        return isinstance(self.core, faiss.IndexHNSW)

    def training_size(self) -> int:
        """Vectors needed to train this index well (FAISS asks 39 per centroid)."""
        if self.is_trained:
            return 0
        ivf = faiss.try_extract_index_ivf(self.core)
        need = 39 * ivf.nlist if ivf is not None else 1
        if "PQ" in self.factory:
            need = max(need, 39 * 256)
        return need

    # -- contents --------------------------------------------------------------------
    def __len__(self) -> int:
        staged = sum(len(ids) for ids in self._staged_ids)
        return int(self._index.ntotal) - len(self._deleted) + staged

    @property
    def tombstones(self) -> int:
        """Removed ids still in an HNSW graph (skipped by searches)."""
        return len(self._deleted)

    @property
    def needs_compaction(self) -> bool:
        """Tombstones are over a fifth of the graph: time to rebuild it."""
        return len(self._deleted) > 0.2 * max(1, int(self._index.ntotal))

    def ids(self) -> np.ndarray:
        """The ids it holds (tombstones excluded, staged vectors included), ascending."""
        if isinstance(self._index, faiss.IndexIDMap2):
            held = faiss.vector_to_array(self._index.id_map)
        else:
            lists = faiss.extract_index_ivf(self._index).invlists
            held = np.concatenate([np.zeros(0, dtype=np.int64)] + [
                faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
                for n in range(lists.nlist) if lists.list_size(n)])
        held = np.concatenate([held.astype(np.int64), *self._staged_ids])
        if self._deleted:
            held = held[~np.isin(held, np.fromiter(self._deleted, dtype=np.int64))]
        return np.sort(held)

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantisers on ``vectors`` (a sample of what the index will hold)."""
        if not self.is_trained:
            self._index.train(self._as_matrix(vectors))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = self._as_matrix(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        if not self.is_trained:
            self._stage(ids, vectors)
            return
        self._index.add_with_ids(vectors, ids)

    def _stage(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._staged_ids.append(ids)
        self._staged.append(vectors)
        if sum(len(i) for i in self._staged_ids) < self.training_size():
            return
        ids, vectors = np.concatenate(self._staged_ids), np.concatenate(self._staged)
        self._staged_ids, self._staged = [], []
        self.train(vectors)
        self.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        removed = self._unstage(ids)
        if self.is_hnsw:
            present = ids[self._contains(ids)]
            fresh = set(present.tolist()) - self._deleted
            self._deleted.update(fresh)
            return removed + len(fresh)
        return removed + int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        known = faiss.vector_to_array(self._index.id_map)
        return np.isin(ids, known)

    def _unstage(self, ids: np.ndarray) -> int:
        removed = 0
        for n, staged in enumerate(self._staged_ids):
            keep = ~np.isin(staged, ids)
            removed += int((~keep).sum())
            self._staged_ids[n], self._staged[n] = staged[keep], self._staged[n][keep]
        return removed

    # -- search ----------------------------------------------------------------------
    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = self._as_matrix(vectors)
        k = max(1, min(k, len(self))) if len(self) else 1
        if not len(self):
            empty = np.full((len(vectors), k), -1, dtype=np.int64)
            return np.full((len(vectors), k), -np.inf, dtype=np.float32), empty
        if self._staged_ids:
            return self._search_staged(vectors, k, allowed_ids)
        selector = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
        elif self._deleted:
            deleted = np.fromiter(self._deleted, dtype=np.int64, count=len(self._deleted))
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(deleted))
        with one_thread(len(vectors) < SMALL_BATCH):
            return self._index.search(vectors, k, params=self._params(selector))

    def _params(self, selector) -> faiss.SearchParameters | None:
        if selector is None:
            return None
        ivf = faiss.try_extract_index_ivf(self.core)
        if ivf is not None:  # IVF needs its own parameter type, so nprobe must be repeated
            return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
        return faiss.SearchParameters(sel=selector)

    def _search_staged(self, vectors, k, allowed_ids) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over vectors waiting for training (a small index)."""
        ids, stored = np.concatenate(self._staged_ids), np.concatenate(self._staged)
        if allowed_ids is not None:
            keep = np.isin(ids, allowed_ids)
            ids, stored = ids[keep], stored[keep]
        scores = vectors @ stored.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        found = ids[order]
        if found.shape[1] < k:
            pad = k - found.shape[1]
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
        return top, found

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves either the old files or the new ones.

        HNSW tombstones go to ``PATH.deleted.npy`` and vectors waiting for training to
        ``PATH.staged.npz``, both written first (the catalog's stamp, written last, vouches
        for all three): an untrained index keeps what it holds."""
        path = Path(path)
        deleted = np.fromiter(sorted(self._deleted), dtype=np.int64, count=len(self._deleted))
        ids = np.concatenate([np.zeros(0, dtype=np.int64), *self._staged_ids])
        vectors = np.concatenate([np.zeros((0, self.dim), dtype=np.float32), *self._staged])
        try:
            with atomic_path(tombstone_path(path)) as tmp:
                _save_array(tmp, deleted)
            with atomic_path(staged_path(path)) as tmp:
                _save_staged(tmp, ids, vectors)
            with atomic_path(path) as tmp:
                faiss.write_index(self._index, str(tmp))
        except (OSError, RuntimeError) as exc:  # FAISS reports a failed write as RuntimeError
            if is_disk_full(exc):
                raise _disk_full(path) from None
            raise

    @classmethod
    def load(cls, path: Path, factory: str, search_params: str = "") -> FaissIndex:
        """Read an index written by :meth:`save`; ``search_params`` are applied again."""
        path = Path(path)
        loaded = faiss.read_index(str(path))
        index = cls.__new__(cls)
        index.dim = int(loaded.d)
        index.factory = factory
        if not (_is_ivf(loaded) or isinstance(loaded, faiss.IndexIDMap2)):
            loaded = faiss.IndexIDMap2(loaded)
        index._setup(loaded, search_params)
        deleted = tombstone_path(path)
        if deleted.exists():
            index._deleted = set(np.load(deleted).tolist())
        staged = staged_path(path)
        if staged.exists():
            with np.load(staged) as blob:
                if len(blob["ids"]):
                    index._staged_ids, index._staged = [blob["ids"]], [blob["vectors"]]
        return index

    def _as_matrix(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        return vectors


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Run FAISS calls of this thread on one OpenMP thread (the setting is per thread)."""
    if not active:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def tombstone_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.deleted.npy")


def staged_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.staged.npz")


def _save_staged(path: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, ids=ids, vectors=vectors)


def _quick_pq_training(index: faiss.Index) -> None:
    """PQ k-means on 3-5 dimensional sub-vectors is slow in FAISS (over a minute for 20k
    vectors here): train each sub-quantiser on at most 64 points per centroid, 10 rounds,
    and skip polysemous training (codes are never compared by Hamming distance here)."""
    pq = getattr(index, "pq", None)
    if pq is None:
        return
    pq.cp.max_points_per_centroid = 64
    pq.cp.niter = 10
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def _is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


class DiskFullError(OSError):
    """A catalog file could not be written for lack of space (ENOSPC or EDQUOT)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: an OSError's errno, SQLite's "database or disk
    is full", or a FAISS write error naming ENOSPC."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "disk is full" in text or os.strerror(errno.ENOSPC) in text


def _disk_full(path: Path) -> DiskFullError:
    error = DiskFullError(f"{path.parent}: the disk is full: the index could not be saved "
                          "(the database keeps every stored vector; free some space and run "
                          "the command again)")
    error.errno = errno.ENOSPC
    return error


def create_index(dim: int, factory: str = DEFAULT_FACTORY, search_params: str = "") -> VectorIndex:
    """The index factory: today FAISS; another engine can be chosen here later."""
    return FaissIndex(dim, factory, search_params)


def exact_top_k(
    queries: np.ndarray, chunks, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (scores, ids) of ``queries`` over ``chunks``, an
    iterable of (ids, vectors) such as ``Store.iter_vectors()``: the reference for recall."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for ids, vectors in chunks:
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        every = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(every, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_ids, order, 1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k ids that ``found`` (same shape) also returns."""
    if not len(exact):
        return 1.0
    hits = [len(set(f.tolist()) & set(e.tolist())) / max(1, len(e))
            for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits))

"""The vector index behind a small interface, so another engine can stand in for FAISS.

Vectors are L2-normalised, so inner product is cosine similarity. Ids are int64 image ids
owned by the catalog's store.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import faiss
import numpy as np

DEFAULT_FACTORY = "Flat"


@runtime_checkable
class VectorIndex(Protocol):
    """What the catalog needs from a vector index."""

    dim: int
    factory: str

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query row; missing results have id -1."""
        ...

    def save(self, path: Path) -> None: ...


class FaissIndex:
    """A FAISS index built from a factory string (``"Flat"``, ``"HNSW32"``, ``"IVF256,PQ32"``)."""

    def __init__(self, dim: int, factory: str = DEFAULT_FACTORY):
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.factory = factory
        try:
            inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {exc}") from None
        self._index = faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = self._as_matrix(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        if not self._index.is_trained:
            self._index.train(vectors)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = self._as_matrix(vectors)
        k = max(1, min(k, len(self))) if len(self) else 1
        params = None
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(allowed_ids, dtype=np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        if not len(self):
            empty = np.full((len(vectors), k), -1, dtype=np.int64)
            return np.full((len(vectors), k), -np.inf, dtype=np.float32), empty
        scores, ids = self._index.search(vectors, k, params=params)
        return scores, ids

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves either the old file or the new one."""
        path = Path(path)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            faiss.write_index(self._index, tmp)
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, factory: str) -> FaissIndex:
        loaded = faiss.read_index(str(path))
        index = cls.__new__(cls)
        index.dim = int(loaded.d)
        index.factory = factory
        index._index = (
            loaded if isinstance(loaded, faiss.IndexIDMap2) else faiss.IndexIDMap2(loaded)
        )
        return index

    def _as_matrix(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        return vectors


def create_index(dim: int, factory: str = DEFAULT_FACTORY) -> VectorIndex:
    """The index factory: today FAISS; another engine can be chosen here later."""
    return FaissIndex(dim, factory)

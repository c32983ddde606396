"""What a catalog needs from its storage: :class:`CatalogStore`, and where one is opened.

A store knows image rows (ids, items, paths, content hashes, boxes), their vectors, item
and image metadata, ``where`` filters and a few meta strings (the model identity the
catalog writes there, the index choice); it knows no models. Its invariants:

* every write (:meth:`CatalogStore.add_images`, :meth:`~CatalogStore.remove_item`,
  :meth:`~CatalogStore.update_item`, :meth:`~CatalogStore.set_meta`) is one transaction:
  all of it is visible or none;
* image ids are never reused and a stored vector never changes;
* :attr:`CatalogStore.generation` grows with every committed write, by any process, so a
  cache of the store's contents is fresh while its generation is the store's;
* filter semantics (:meth:`CatalogStore.filtered_image_ids`) live in the store alone.

Two backends: :class:`vestis.catalog.local.LocalStore` (SQLite + FAISS in the catalog
directory) and :class:`vestis.catalog.milvus.MilvusStore` (``milvus://HOST:PORT/COLLECTION``
or ``milvus-lite:PATH``, through pymilvus), which keeps these invariants as far as Milvus
allows (its docstring and the README say where it cannot: no transaction across
collections, no cross-process lock). :func:`store_kind` tells them apart;
:func:`vestis.catalog.stores.open_store` opens either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vestis.catalog.store import VECTOR_BATCH, ImageRow, NewImage, filter_text

# "milvus:" alone, not "milvus://": a URI that went through ``pathlib.Path`` (the CLI's
# --catalog) has lost one of its slashes.
MILVUS_PREFIXES = ("milvus:", "milvus-lite:")
__all__ = ["CatalogStore", "ItemHit", "ReadOnlyCatalogError", "filter_text", "store_kind"]


class ReadOnlyCatalogError(PermissionError):
    """A write to a catalog that can only be read (a read-only mount or files)."""


@dataclass(frozen=True)
class ItemHit:
    """One item found by a vector search: its best image, that image's score and the
    item's own metadata (the image's metadata overrides it, key by key)."""

    score: float
    row: ImageRow
    item_metadata: dict[str, Any]


class CatalogStore(Protocol):
    """The storage of one catalog: rows, vectors, metadata, filters and meta strings."""

    read_only: bool

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None: ...

    def set_meta(self, values: dict[str, str]) -> None: ...

    def create_meta(self, values: dict[str, str], key: str) -> dict[str, str]:
        """Store ``values`` unless ``key`` is set, atomically; returns what is stored."""
        ...

    @property
    def generation(self) -> int:
        """Grows with every committed write (vectors, metadata, meta), by any process."""
        ...

    def writing(self) -> AbstractContextManager[None]:
        """Hold the store for one writer (re-entrant); ReadOnlyCatalogError when it is
        read-only. Compound writes (check, then change) run inside it."""
        ...

    # -- writes ------------------------------------------------------------------------
    def add_images(self, images: Sequence[NewImage], item_metadata: dict[str, dict], *,
                   model_id: str | None = None) -> list[int]:
        """Insert images with their vectors (creating or merging their items) in one
        transaction, checked against the stored ``model_id`` and ``dim``; returns the new
        ids, -1 for an image already stored for its item (same content hash)."""
        ...

    def commit(self) -> None:
        """Make the writes of this process durable beyond the rows (the index, for
        backends that keep one); called once after a batch of adds."""
        ...

    def remove_item(self, item_id: str) -> list[int]:
        """Delete an item and its images; returns their ids (KeyError when unknown)."""
        ...

    def update_item(self, item_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Set item metadata (``None`` deletes a key); returns the item's new metadata."""
        ...

    # -- reads -------------------------------------------------------------------------
    def count_items(self) -> int: ...

    def count_images(self) -> int: ...

    def known_hashes(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]: ...

    def item_ids(self) -> list[str]: ...

    def item_metadata(self, item_id: str) -> dict[str, Any] | None: ...

    def images_of(self, item_id: str) -> list[ImageRow]: ...

    def images_by_id(self, image_ids: Sequence[int]) -> dict[int, ImageRow]: ...

    def image_ids(self) -> np.ndarray: ...

    def iter_vectors(self, batch: int = VECTOR_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (image ids, vectors) in id order, in chunks: what an index is rebuilt from."""
        ...

    def vectors_by_id(self, image_ids: Sequence[int], batch: int = VECTOR_BATCH) -> np.ndarray: ...

    def sample_image_ids(self, limit: int, seed: int = 0) -> np.ndarray: ...

    def filtered_image_ids(self, where: dict[str, Any]) -> np.ndarray:
        """Ids of images whose metadata (the image's own, else its item's) equals every
        ``where`` value (AND); a list value means any of its values; ``item_id`` filters
        on the item. The one definition of filter semantics."""
        ...

    def metadata_keys(self) -> list[str]: ...

    def search_items(self, vectors: np.ndarray, k: int,
                     where: dict[str, Any] | None = None) -> list[list[ItemHit]]:
        """Per query vector, the ``k`` best items (each once, by its best image) among the
        images ``where`` keeps."""
        ...

    # -- the vector index (each backend keeps its own; these are its whole interface) --
    def index_info(self) -> dict[str, Any]:
        """``indexed_vectors``, ``index_in_sync`` (the index holds exactly the stored
        ids) and ``index_bytes_per_vector``."""
        ...

    def measure_recall(self, k: int = 10, *, queries: int = 200, seed: int = 0) -> float: ...

    def rebuild_index(self, index: str | None = None, search_params: str | None = None
                      ) -> None:
        """Rebuild the index from the stored vectors (``index``: a new index choice)."""
        ...

    def save(self) -> None: ...

    def close(self) -> None: ...


def store_kind(location: str) -> str:
    """``milvus`` for a Milvus URI, ``local`` for a catalog directory."""
    return "milvus" if str(location).startswith(MILVUS_PREFIXES) else "local"

"""Where a catalog's store is opened: a directory (:class:`~vestis.catalog.local.LocalStore`)
or a Milvus URI (:class:`~vestis.catalog.milvus.MilvusStore`), by
:func:`vestis.catalog.backend.store_kind`. Milvus (``pymilvus``) is imported only for a
Milvus URI: ``pip install 'vestis[milvus]'``."""

from __future__ import annotations

from pathlib import Path

from vestis.catalog.backend import CatalogStore, store_kind
from vestis.catalog.index import create_index, resolve_factory
from vestis.catalog.local import LocalStore, recover_swap


def _milvus():
    try:
        from vestis.catalog import milvus
    except ImportError as exc:  # pymilvus missing
        raise ImportError(f"a Milvus catalog needs pymilvus ({exc}): "
                          "pip install 'vestis[milvus]' (pymilvus, milvus-lite)") from exc
    return milvus


def open_store(location: str | Path) -> CatalogStore:
    """The store named by ``location``: a Milvus URI or a catalog directory."""
    if store_kind(str(location)) == "milvus":
        return _milvus().MilvusStore(str(location))
    return LocalStore(Path(location).expanduser())


def store_exists(location: str | Path) -> bool:
    """Whether a catalog is stored there (nothing is created to find out; a re-embedding's
    switch that a crash cut short is finished first, as opening the catalog would)."""
    if store_kind(str(location)) == "milvus":
        return _milvus().MilvusStore.exists(str(location))
    path = Path(location).expanduser()
    recover_swap(path)
    return LocalStore.exists(path)


def check_index_choice(location: str | Path, choice: str, dim: int) -> None:
    """ValueError when that kind of store cannot build the index ``choice``."""
    if store_kind(str(location)) == "milvus":
        milvus = _milvus()
        milvus.milvus_index(choice, 0, dim,
                            lite=milvus.MilvusLocation(str(location)).file is not None)
    else:
        create_index(dim, resolve_factory(choice, 0, dim))


def files_dir(location: str | Path) -> Path:
    """The directory for a catalog's files outside its store (server uploads, caches,
    relative image paths): the catalog directory itself, or one beside a Milvus Lite database
    (``PATH.files``), or ``~/.cache/vestis/milvus/HOST_PORT/COLLECTION`` for a server."""
    if store_kind(str(location)) == "milvus":
        return _milvus().MilvusLocation(str(location)).files_dir
    return Path(location).expanduser()

"""The catalog: a store (SQLite + FAISS in a directory today) composed with a model and
ingest."""

from vestis.catalog.backend import CatalogStore
from vestis.catalog.catalog import (
    Catalog,
    IngestReport,
    Item,
    Match,
    ModelMismatchError,
    ReadOnlyCatalogError,
)
from vestis.catalog.garments import GarmentCropper, GarmentHits
from vestis.catalog.index import DEFAULT_FACTORY, FaissIndex, VectorIndex, create_index
from vestis.catalog.local import LocalStore
from vestis.catalog.sources import read_source

__all__ = [
    "DEFAULT_FACTORY",
    "Catalog",
    "CatalogStore",
    "FaissIndex",
    "GarmentCropper",
    "GarmentHits",
    "IngestReport",
    "Item",
    "LocalStore",
    "Match",
    "ModelMismatchError",
    "ReadOnlyCatalogError",
    "VectorIndex",
    "create_index",
    "read_source",
]

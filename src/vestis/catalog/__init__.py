"""The catalog: a directory holding an SQLite store and a vector index."""

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
from vestis.catalog.sources import IngestRecord, read_source

__all__ = [
    "DEFAULT_FACTORY",
    "Catalog",
    "FaissIndex",
    "GarmentCropper",
    "GarmentHits",
    "IngestRecord",
    "IngestReport",
    "Item",
    "Match",
    "ModelMismatchError",
    "ReadOnlyCatalogError",
    "VectorIndex",
    "create_index",
    "read_source",
]

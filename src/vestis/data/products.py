"""A shop's product table: attributes, texts and curated "related products" links.

The Luma layout is ``catalog.csv`` (one row per image, with a ``product`` column),
``products.csv`` (one row per product: ``name``, ``description`` and attribute columns whose
multiple values are separated by ``;``) and ``related.csv`` (``product,related_product``).

:func:`product_split` holds out the same products as the training recipes do (the Luma
source of ``configs/vestis-lite0.yaml``: split by product, ``val_fraction`` 0.2, seed 0), so
that heads trained on top of the default model are evaluated on products that neither they
nor the backbone saw.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vestis.data.datasets import read_luma, split_by_group
from vestis.records import ImageRecord

#: Columns of products.csv that hold attributes (multi-valued, ``;``-separated).
ATTRIBUTE_COLUMNS = (
    "material", "pattern", "climate", "style_general", "style_bottom",
    "eco_collection", "performance_fabric",
)
#: Columns that are text, not attributes.
TEXT_COLUMNS = ("name", "description")
MISSING = {"", "n/a", "none", "null"}


@dataclass(frozen=True)
class Product:
    """One product (a design; its colours are different items)."""

    product: str
    name: str = ""
    description: str = ""
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    price: str = ""

    def values(self, column: str) -> tuple[str, ...]:
        return self.attributes.get(column, ())

    def text(self, category: str | None = None) -> str:
        """Name, category, description and attributes, as one text to embed or to index."""
        parts = [self.name]
        if category:
            parts.append(category.replace("/", " "))
        parts.append(self.description)
        for column, values in self.attributes.items():
            if values and column not in ("eco_collection", "performance_fabric"):
                parts.append(f"{column.replace('_', ' ')}: {', '.join(values)}")
        return ". ".join(part for part in parts if part)


def _values(cell: str | None) -> tuple[str, ...]:
    if cell is None:
        return ()
    values = (value.strip() for value in cell.split(";"))
    return tuple(value for value in values if value.lower() not in MISSING)


def read_products(path: str | Path, columns: Sequence[str] | None = None) -> dict[str, Product]:
    """``products.csv`` as ``{product: Product}``. ``columns`` defaults to every column
    that is not text, price or the product key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no products table at {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "product" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a 'product' column")
        chosen = list(columns) if columns is not None else [
            name for name in reader.fieldnames
            if name not in ("product", "price", *TEXT_COLUMNS)]
        missing = [name for name in chosen if name not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: no column(s) {', '.join(missing)}")
        products = {}
        for row in reader:
            key = (row.get("product") or "").strip()
            if not key:
                continue
            products[key] = Product(
                product=key, name=(row.get("name") or "").strip(),
                description=(row.get("description") or "").strip(),
                attributes={name: _values(row.get(name)) for name in chosen},
                price=(row.get("price") or "").strip())
    if not products:
        raise ValueError(f"{path}: no products")
    return products


def read_related(path: str | Path, products: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """``related.csv`` links as (product, related_product) pairs, kept when both ends are in
    ``products`` (when given)."""
    known = set(products) if products is not None else None
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"product", "related_product"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs columns product,related_product")
        links = [(row["product"].strip(), row["related_product"].strip()) for row in reader]
    return [(a, b) for a, b in links if known is None or (a in known and b in known)]


def product_split(
    catalog_csv: str | Path, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held-out) images of a Luma-layout catalog, split by product exactly as the
    default model's recipe split it."""
    samples = read_luma(catalog_csv)
    return split_by_group(samples, lambda s: s.group or s.item_id, val_fraction, seed)


def products_of(samples: Iterable[ImageRecord]) -> set[str]:
    return {sample.group or sample.item_id for sample in samples}


def write_catalog_rows(catalog_csv: str | Path, keep, out: str | Path) -> Path:
    """The rows of a catalog CSV that ``keep(row)`` accepts, with absolute image paths, as a
    new CSV at ``out`` (a catalog of some products, e.g. the held-out ones)."""
    catalog_csv, out = Path(catalog_csv), Path(out)
    with catalog_csv.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if keep(row)]
    if not rows:
        raise ValueError(f"{catalog_csv}: no row kept")
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": str((catalog_csv.parent / row["image"]).resolve())})
    return out

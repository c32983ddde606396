"""Metadata that comes from outside the photos' own CSV: a shop's product table, and the
attribute heads' predictions (``predicted.<family>`` keys, usable as search filters)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from vestis.data.products import Product

if TYPE_CHECKING:
    from vestis.catalog.catalog import Catalog
    from vestis.models.attributes import AttributeModel

#: The item metadata key that names an item's product row.
PRODUCT_KEY = "product"


def join_products(catalog: Catalog, products: Mapping[str, Product]) -> int:
    """Copy each item's product row (description and attributes, ``;``-joined) into its
    metadata, where the item has a ``product`` value found in ``products``. Returns how many
    items were updated; existing keys are overwritten by the table."""
    updated = 0
    for item_id in catalog.item_ids():
        product = products.get(str(catalog.get(item_id).metadata.get(PRODUCT_KEY, "")))
        if product is None:
            continue
        values = {column: ";".join(v) for column, v in product.attributes.items() if v}
        if product.description:
            values["description"] = product.description
        catalog.update(item_id, values)
        updated += 1
    return updated


def annotate_attributes(catalog: Catalog, model: AttributeModel, *, overwrite: bool = False,
                        progress: bool = False) -> int:
    """Predict each item's category and attributes (its images' features averaged) and store
    the most likely value of each family as ``predicted.<family>``. Items that already have
    predictions are skipped unless ``overwrite``. Returns how many items were annotated."""
    todo = []
    for item_id in catalog.item_ids():
        item = catalog.get(item_id)
        if overwrite or not any(k.startswith("predicted.") for k in item.metadata):
            todo.append(item)
    for item in tqdm(todo, desc="attributes", unit="item", disable=not progress):
        paths = [row.path for row in item.images]
        if not paths:
            continue
        features = model.features(paths).mean(0, keepdims=True)
        description = model.describe_features(np.asarray(features))[0]
        catalog.update(item.item_id, description.as_metadata())
    return len(todo)

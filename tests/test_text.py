"""Offline text search on real Luma photos and texts (no mocks of project components)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from vestis.catalog import Catalog, ModelMismatchError
from vestis.data.products import read_products
from vestis.text import (
    LexicalIndex,
    alignment_for,
    embed_texts,
    load_alignment,
    search_image_text,
    search_text,
)
from vestis.text.align import AlignmentHead, TextAlignment, build_pairs, fit_head, pair_loss
from vestis.text.texts import leaf_word

#: Held-out products (unseen by vestis-lite0 and the shipped head): two hoodies, two jackets
#: and a tee, in black, gray, green, blue, red, orange, yellow and lavender.
PRODUCTS = ("mh07", "mh13", "mj01", "mj03", "ms08")


@pytest.fixture(scope="module")
def products(data_dir):
    return read_products(data_dir / "luma" / "products.csv")


@pytest.fixture(scope="module")
def rows(luma_rows, data_dir) -> list[dict[str, str]]:
    chosen = [dict(row) for row in luma_rows if row["product"] in PRODUCTS]
    for row in chosen:
        row["image"] = str(data_dir / "luma" / row["image"])
    return chosen


@pytest.fixture(scope="module")
def small_catalog(rows, tmp_path_factory) -> Catalog:
    folder = tmp_path_factory.mktemp("text")
    path = folder / "catalog.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    catalog = Catalog(folder / "catalog", model="vestis-lite0")
    catalog.add(path)
    yield catalog
    catalog.close()


def test_encoder_gives_unit_384d_vectors_and_meaningful_similarity(data_dir):
    vectors = embed_texts(["a black hooded sweatshirt", "dark hoodie with a zip",
                           "red running shorts", ""])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1
    np.testing.assert_allclose(embed_texts(["a black hooded sweatshirt"])[0], vectors[0], atol=1e-5)


def test_bm25_ranks_the_exact_name_first(luma_rows, products):
    items = {row["item_id"]: row for row in luma_rows}
    index = LexicalIndex.from_items(items.items(), products)
    for item_id in ("mh07-black", "wj07-red", "ms08-blue"):
        meta = items[item_id]
        assert index.search(f"{meta['name']} {meta['colour']}", 5)[0][0] == item_id
    # Luma has three black hoodies; descriptions of others say "gray and black hoodie".
    top = [items[i] for i, _ in index.search("black hoodie", 3)]
    assert all(m["colour"] == "black" and leaf_word(m["category"]) == "hoodie" for m in top)


def test_alignment_training_reduces_infonce_and_saved_head_checks_model(rows, products,
                                                                        tmp_path):
    rng = np.random.default_rng(0)
    # Stand-in image vectors with the structure of real ones: one direction per colour
    # and one per product; the texts and their vectors are the real ones.
    colours = {c: rng.normal(size=64) for c in sorted({r["colour"] for r in rows})}
    designs = {p: rng.normal(size=64) for p in PRODUCTS}
    vectors = np.stack([colours[r["colour"]] + designs[r["product"]] + 0.1 * rng.normal(size=64)
                        for r in rows]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = build_pairs(rows, vectors, products)
    before = pair_loss(AlignmentHead(384, 64), pairs)
    head = fit_head(pairs, steps=150, lr=3e-3)
    assert pair_loss(head, pairs) < 0.6 * before
    path = TextAlignment(head, "some-model@1234").save(tmp_path / "head.pt")
    assert path.stat().st_size < 1_000_000
    loaded = load_alignment(path, "some-model@1234")
    np.testing.assert_allclose(loaded.project(pairs.text_vectors[0]),
                               head(torch.from_numpy(pairs.text_vectors[0])).detach().numpy(),
                               atol=2e-2)
    with pytest.raises(ModelMismatchError):
        load_alignment(path, "vestis-lite1@abcd")


def test_shipped_head_is_small_and_belongs_to_the_default_model(small_catalog):
    head = alignment_for(small_catalog.model_id)
    weights = Path(__file__).resolve().parents[1] / "src/vestis/text/weights"
    # a linear map into the default model's 1565-d space, fp16: 1.2 MB
    assert sum(f.stat().st_size for f in weights.glob("*.pt")) < 1_500_000
    assert head.model_id == small_catalog.model_id
    with pytest.raises(ModelMismatchError):
        head.check("another-model@0")


@pytest.mark.parametrize("mode", ["hybrid", "bm25", "embedding"])
@pytest.mark.parametrize("garment", ["hoodie", "jacket", "tee"])
def test_colour_and_garment_query_returns_that_colour(small_catalog, mode, garment):
    matches = search_text(small_catalog, f"black {garment}", 3, mode=mode)
    right = [m.metadata["colour"] == "black" and leaf_word(m.metadata["category"]) == garment
             for m in matches]
    # The catalog has one black item per garment. The embedding alone is weaker on colour
    # (held-out P@1 0.62 in bench/bench_text.py): it must find it in the top 3.
    assert right[0] if mode != "embedding" else any(right), (mode, matches)
    assert all(m.path and m.image_id >= 0 for m in matches)


def test_where_filter_and_bad_arguments(small_catalog):
    found = search_text(small_catalog, "black hoodie", 5, where={"colour": "red"})
    assert found and all(m.metadata["colour"] == "red" for m in found)
    with pytest.raises(ValueError):
        search_text(small_catalog, "black hoodie", mode="clip")
    with pytest.raises(ValueError):
        search_text(small_catalog, "   ")


@pytest.mark.parametrize("mode", ["embedding", "hybrid"])
def test_photo_plus_colour_moves_results_to_that_colour(small_catalog, rows, mode):
    photo = next(r["image"] for r in rows if r["item_id"] == "mj03-black" and r["view"] == "main")

    def reds(found) -> int:
        return sum(m.metadata["colour"] == "red" for m in found)

    image_only = small_catalog.search(photo, 5)
    assert reds(search_image_text(small_catalog, photo, "red", 5, 0.6, mode=mode)) > reds(
        image_only)
    top = search_image_text(small_catalog, photo, "red", 3, 0.6, mode=mode)
    assert "mj03-red" in [m.item_id for m in top]


def test_a_metadata_update_is_visible_to_text_search_at_once(small_catalog):
    """The BM25 texts key on the catalog's generation: an update by another catalog object
    (``vestis update`` in another process) is searched by the next query, no refresh."""
    item_id = small_catalog.item_ids()[0]
    old = small_catalog.get(item_id).metadata["colour"]
    assert item_id not in [m.item_id for m in search_text(small_catalog, "vermilion", 3,
                                                          mode="bm25")]
    with Catalog(small_catalog.path) as other:
        other.update(item_id, {"colour": "vermilion"})
    try:
        found = search_text(small_catalog, "vermilion", 3, mode="bm25")
        assert found[0].item_id == item_id
        assert [m.item_id for m in search_text(small_catalog, "vermilion", 3, mode="bm25",
                                               where={"colour": "vermilion"})] == [item_id]
    finally:
        small_catalog.update(item_id, {"colour": old})
    assert all(m.item_id != item_id
               for m in search_text(small_catalog, "vermilion", 3, mode="bm25"))

"""Text → image search on held-out Luma products: BM25, the aligned embedding, hybrid.

Usage::

    nice -n 5 python bench/bench_text.py [--update BENCHMARKS.md]

The catalog holds the held-out images only (the products that neither the image model nor
the text head saw: :func:`vestis.data.products.product_split`). Queries:

* ``name``: each item's colour + product name ("black Stark Fundamental Hoodie");
* ``colour+garment``: "<colour> <garment word>" for each such pair of the held-out items
  ("black hoodie"); correct = the item has that colour and category. P@5 is divided by
  min(5, the number of correct items), so 1.0 is reachable;
* ``description``: the product's description with its name removed (no colour in it: any
  colour of the product is a near miss, only the query's own item counts).

Recall@K is a hit rate: the query's item among the top K items. BM25 runs on the catalog's
metadata (name, colour, category) alone, as a shop catalog CSV gives it, and with
``products.csv`` texts (description, attributes) added. ``photo+colour``: each held-out
photo whose product has another colour held out, with that colour as the text ("like this
photo, but in red"): R@10 of that other-colour item and the share of the top 5 in the asked
colour, against image-only search (text weight 0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vestis.catalog import Catalog
from vestis.data.products import product_split, products_of, read_products
from vestis.evaluation import bootstrap_intervals
from vestis.models import Encoder
from vestis.taxonomy import category_leaf
from vestis.text import alignment_for, search_image_text, search_text
from vestis.text.align import image_vectors, read_rows
from vestis.text.texts import leaf_word, strip_name

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "luma"
META = ("product", "colour", "view", "category", "name")
KS = (1, 5, 10)


def held_out_catalog(folder: Path, rows: list[dict], model: str) -> Catalog:
    """A catalog of the rows, from cached image vectors (the same as ``catalog.add``'s)."""
    encoder = Encoder.from_name(model)
    vectors = image_vectors([row["image"] for row in rows], encoder, REPO / "runs" / "text")
    catalog = Catalog(folder, model=model, encoder=encoder)
    catalog.add_vectors([row["item_id"] for row in rows], vectors, model_id=encoder.model_id,
                        paths=[row["image"] for row in rows],
                        metadata=[{key: row[key] for key in META} for row in rows])
    return catalog


def recall(ranked: Sequence[list[str]], targets: Sequence[str]) -> list[np.ndarray]:
    """Per K, each query's hit (its item in the top K)."""
    return [np.array([t in r[:k] for r, t in zip(ranked, targets, strict=True)], float)
            for k in KS]


def cells(columns: list[np.ndarray], groups: Sequence[str]) -> list[str]:
    """Each column's mean and its 95 % bootstrap interval (``groups`` resampled whole)."""
    values = {str(n): column for n, column in enumerate(columns)}
    intervals = bootstrap_intervals(values, groups)
    return [f"{values[n].mean():.3f} ({intervals[n][0]:.2f}-{intervals[n][1]:.2f})"
            for n in values]


def is_correct(meta: dict, colour: str, word: str) -> bool:
    words = {leaf_word("x/" + part) for part in category_leaf(meta["category"]).split("&")}
    return meta["colour"] == colour and word in words


def colour_garment(ranked, pairs, items) -> list[np.ndarray]:
    """Per query, P@1 and normalised P@5 of colour + category correctness."""
    p1, p5 = [], []
    for result, (colour, word) in zip(ranked, pairs, strict=True):
        relevant = sum(is_correct(meta, colour, word) for meta in items.values())
        hits = [is_correct(items[i], colour, word) for i in result[:5]]
        p1.append(float(hits[0]) if hits else 0.0)
        p5.append(sum(hits) / min(5, relevant))
    return [np.array(p1), np.array(p5)]


def text_table(catalog: Catalog, items: dict, products) -> tuple[list[str], dict]:
    names = {i: f"{m['colour']} {m['name']}" for i, m in items.items()}
    descriptions = {i: strip_name(products[m["product"]].description, m["name"])
                    for i, m in items.items()}
    pairs = sorted({(m["colour"], leaf_word(m["category"])) for m in items.values()})
    runs: dict[str, Callable[[str], list[str]]] = {
        "BM25 (catalog metadata)": lambda q: _ids(search_text(catalog, q, 10, mode="bm25")),
        "BM25 (+ products.csv texts)": lambda q: _ids(
            search_text(catalog, q, 10, mode="bm25", products=products)),
        "embedding (aligned MiniLM)": lambda q: _ids(
            search_text(catalog, q, 10, mode="embedding")),
        "hybrid (catalog metadata)": lambda q: _ids(search_text(catalog, q, 10)),
        "hybrid (+ products.csv texts)": lambda q: _ids(
            search_text(catalog, q, 10, products=products)),
    }
    lines = ["| method | name R@1 | R@5 | R@10 | description R@1 | R@5 | R@10 "
             "| colour+garment P@1 | P@5 |", "|---" * 9 + "|"]
    by_product = [m["product"] for m in items.values()]
    for method, run in runs.items():
        row = cells(recall([run(names[i]) for i in items], list(items)), by_product)
        row += cells(recall([run(descriptions[i]) for i in items], list(items)), by_product)
        row += cells(colour_garment([run(f"{c} {w}") for c, w in pairs], pairs, items),
                     [f"{c} {w}" for c, w in pairs])
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines, {"pairs": len(pairs)}


def photo_colour_table(catalog: Catalog, rows: list[dict], vectors: np.ndarray,
                       items: dict) -> list[str]:
    by_product: dict[str, set[str]] = {}
    for meta in items.values():
        by_product.setdefault(meta["product"], set()).add(meta["colour"])
    queries = [(n, f"{row['product']}-{colour}", colour) for n, row in enumerate(rows)
               for colour in sorted(by_product[row["product"]] - {row["colour"]})
               if f"{row['product']}-{colour}" in items]
    lines = [f"| photo + colour ({len(queries)} queries) | target R@10 | asked colour in top 5 |",
             "|---|---|---|"]
    settings = [("image only", 0.0, "embedding")] + [
        (f"{mode}, text weight {w}", w, mode) for mode in ("embedding", "hybrid")
        for w in (0.3, 0.5, 0.7)]
    for label, weight, mode in settings:
        hits, share = [], []
        for n, target, colour in queries:
            found = search_image_text(catalog, vectors[n], colour, 10, weight, mode=mode)
            hits.append(target in _ids(found))
            share.append(np.mean([m.metadata["colour"] == colour for m in found[:5]]))
        cell = cells([np.array(hits, float), np.array(share)],
                     [rows[n]["product"] for n, _, _ in queries])
        lines.append(f"| {label} | " + " | ".join(cell) + " |")
    return lines


def _ids(matches) -> list[str]:
    return [match.item_id for match in matches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog-csv", type=Path, default=DATA / "catalog.csv")
    parser.add_argument("--products", type=Path, default=DATA / "products.csv")
    parser.add_argument("--model", default="vestis-lite0")
    parser.add_argument("--update", type=Path, help="write the section into this BENCHMARKS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    _, held_out = product_split(args.catalog_csv)
    keep = products_of(held_out)
    rows = [row for row in read_rows(args.catalog_csv) if row["product"] in keep]
    products = read_products(args.products)
    with tempfile.TemporaryDirectory() as folder:
        catalog = held_out_catalog(Path(folder) / "catalog", rows, args.model)
        items = {i: catalog.get(i).metadata for i in catalog.item_ids()}
        head = alignment_for(catalog.model_id)
        lines, info = text_table(catalog, items, products)
        vectors = image_vectors([row["image"] for row in rows], catalog.encoder,
                                REPO / "runs" / "text")
        photo = photo_colour_table(catalog, rows, vectors, items)
        catalog.close()
    section = [
        "## Text search (`bench/bench_text.py`)", "",
        f"Held-out Luma products only ({len(keep)} products, {len(items)} items, {len(rows)} "
        f"images, unseen by `{args.model}` and by the text head "
        f"`text-align-lite0` ({head.info.get('items', '?')} training items)). Queries: "
        f"{len(items)} colour + product names, {len(items)} descriptions without the name, "
        f"{info['pairs']} colour + garment-word pairs. R@K: hit rate of the query's item in "
        "the top K; colour+garment P@5 is normalised by min(5, correct items). A cell is the "
        "figure and its 95 % bootstrap interval (queries of one product resampled together; "
        "colour + garment pairs one by one): with 51 queries, differences of a few hundredths "
        "are noise.", "",
        *lines, "", *photo, "",
        f"({time.perf_counter() - started:.0f} s on this machine.)",
    ]
    print("\n".join(section))
    if args.update:
        from recipes import replace_section

        replace_section(args.update, section)




if __name__ == "__main__":
    main()

"""The main job of the README: index a folder of product photos and search it.

A few photos are held out of the index and used as queries: a * marks results that are
the query's own item, found through its other photos.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

from vestis.catalog import Catalog, read_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        default="../shared/data/luma",
        help="folder of photos, or a folder with catalog.csv, or a CSV",
    )
    parser.add_argument("--catalog", default="demo-catalog", help="catalog directory")
    parser.add_argument("--model", default=None, help="model name or checkpoint")
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()

    source = Path(args.source)
    if source.is_dir() and (source / "catalog.csv").exists():
        source = source / "catalog.csv"
    if not source.exists():
        print(f"error: {source} does not exist (set CATALOG=<folder>)", file=sys.stderr)
        return 2
    records = read_source(source)
    counts = Counter(record.item_id for record in records)
    candidates = [r for r in records if counts[r.item_id] > 1] or records
    queries = random.Random(0).sample(candidates, min(args.queries, len(candidates)))
    indexed = [r for r in records if r not in queries]

    print(f"indexing {source} into {args.catalog}/ ({len(queries)} photos held out as queries)")
    with Catalog(args.catalog, model=args.model) as catalog:
        report = catalog.add(indexed, progress=True)
        for path, reason in report.failed:
            print(f"failed: {path}: {reason}", file=sys.stderr)
        print(
            f"indexed {report.added} new images ({report.skipped} already present) "
            f"at {report.images_per_second:.1f} images/s; "
            f"{len(catalog)} items, {catalog.num_images} images, model {catalog.model_name}"
        )
        for record in queries:
            started = time.perf_counter()
            matches = catalog.search(record.path, k=5)
            elapsed = (time.perf_counter() - started) * 1000
            print(f"\nquery {record.path.name} (item {record.item_id}), {elapsed:.0f} ms:")
            for rank, match in enumerate(matches, start=1):
                mark = "*" if match.item_id == record.item_id else " "
                name = match.metadata.get("name", "")
                print(f"  {rank}. {mark} {match.score:.3f}  {match.item_id:<20} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

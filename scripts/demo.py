"""The main job of the README: index a folder of product photos and search it."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from vestis.catalog import Catalog, read_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source",
        default="../shared/data/luma",
        help="folder of photos, or a folder with catalog.csv, or a CSV",
    )
    parser.add_argument("--catalog", default="demo-catalog", help="catalog directory")
    parser.add_argument("--model", default=None, help="model name or checkpoint")
    parser.add_argument("--queries", type=int, default=3)
    args = parser.parse_args()

    source = Path(args.source)
    if source.is_dir() and (source / "catalog.csv").exists():
        source = source / "catalog.csv"
    if not source.exists():
        print(f"error: {source} does not exist (set CATALOG=<folder>)", file=sys.stderr)
        return 2
    print(f"indexing {source} into {args.catalog}/")
    with Catalog(args.catalog, model=args.model) as catalog:
        report = catalog.add(source, progress=True)
        for path, reason in report.failed:
            print(f"failed: {path}: {reason}", file=sys.stderr)
        print(
            f"indexed {report.added} new images ({report.skipped} already present) "
            f"at {report.images_per_second:.1f} images/s; "
            f"{len(catalog)} items, {catalog.num_images} images, model {catalog.model_name}"
        )
        records = read_source(source)
        for record in random.Random(0).sample(records, min(args.queries, len(records))):
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

"""Ingest throughput of a catalog: images/s for indexing a real folder or CSV.

    python bench/bench_index.py [--source ../shared/data/luma/catalog.csv] [--repeats 3]

Each repeat indexes the source into a fresh catalog; the median is reported, along with
the encoder alone (decode + preprocess + embed, no store) measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vestis.catalog import Catalog, read_source
from vestis.models import Encoder

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "luma" / "catalog.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    records = read_source(args.source)
    encoder = Encoder.from_name(args.model)
    print(f"source: {args.source} ({len(records)} images); model {args.model}; "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")

    encode_rates, index_rates = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        encoder.embed([r.path for r in records], [r.box for r in records])
        encode_rates.append(len(records) / (time.perf_counter() - started))
        with tempfile.TemporaryDirectory() as folder, Catalog(folder, encoder=encoder) as catalog:
            report = catalog.add(args.source)
            index_rates.append(report.added / report.seconds)
        print(f"repeat {repeat + 1}: encoder {encode_rates[-1]:.1f} images/s, "
              f"index {index_rates[-1]:.1f} images/s")
    encode, index = statistics.median(encode_rates), statistics.median(index_rates)
    print(f"median: encoder alone {encode:.1f} images/s; vestis index {index:.1f} images/s "
          f"(ratio index/encoder {index / encode:.2f})")


if __name__ == "__main__":
    main()

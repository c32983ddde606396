"""``vestis adapt`` measured: adapt on half of a shop's products, score the other half.

    python bench/bench_adapt.py [--seeds 0,1,2] [--bases vestis-lite0,lite0]
                                 [--update BENCHMARKS.md]

For each shop and seed the products (Luma: by ``product``, so colours of one design stay
together; Bagisto: by item) are split in two halves. ``adapt`` sees only the first half
(holding out part of it for its own check); both the base and the written checkpoint are
then scored on the second half, whose products the adaptation never saw, leave-one-out by
item, with a paired bootstrap interval of the difference. A refused adaptation writes the
base unchanged, so its difference is exactly 0. Nothing here is shipped: the adapted files
are written to a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

from vestis.evaluation import compare_results, retrieval_metrics
from vestis.models import Encoder
from vestis.train.adapt import adapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHOPS = {"Luma": (DATA / "luma" / "catalog.csv", "product"),
         "Bagisto": (DATA / "bagisto" / "catalog.csv", "item_id")}
TITLE = "## Shop adaptation (`bench/bench_adapt.py`)"
METRICS = ("R@1", "mAP")


def halves(csv_path: Path, key: str, seed: int) -> tuple[list[dict], list[dict]]:
    with csv_path.open(newline="") as handle:
        rows = [{**row, "image": str(csv_path.parent / row["image"])}
                for row in csv.DictReader(handle)]
    groups = sorted({row[key] for row in rows})
    random.Random(seed).shuffle(groups)
    first = set(groups[: len(groups) // 2])
    return [r for r in rows if r[key] in first], [r for r in rows if r[key] not in first]


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def score_half(models: list[str], rows: list[dict]):
    paths = [row["image"] for row in rows]
    labels = [row["item_id"] for row in rows]
    results = []
    for model in models:
        vectors = Encoder.from_name(model).embed(paths)
        results.append(retrieval_metrics(vectors, labels, vectors, labels, ks=(1, 10),
                                         query_gallery_index=np.arange(len(labels))))
    groups = [labels[i] for i in results[0].query_indices]
    return compare_results(*results, groups)


def run(shops: list[str], bases: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shop in shops:
            csv_path, key = SHOPS[shop]
            for seed in seeds:
                first, second = halves(csv_path, key, seed)
                source = write_csv(first, Path(folder) / f"{shop}-{seed}.csv")
                for base in bases:
                    out = Path(folder) / f"{shop}-{seed}-{base}.pt"
                    report = adapt(source, out, base=base, seed=seed, progress=False)
                    comparison = score_half([str(out), base], second)
                    rows.append({"shop": shop, "seed": seed, "base": base,
                                 "kept": report.kept, "seconds": report.seconds,
                                 "queries": comparison.n_queries, "comparison": comparison})
                    print(f"{shop} seed {seed} {base}: kept {report.kept}, R@1 "
                          f"{comparison.metrics_b['R@1']:.3f} -> "
                          f"{comparison.metrics_a['R@1']:.3f}", file=sys.stderr)
    return rows


def section(rows: list[dict]) -> list[str]:
    lines = [
        TITLE,
        "",
        "Adapted on half of a shop's products (the first half of a seeded split), scored on "
        "the other half: products the adaptation never saw. Leave-one-out by item on that "
        "half; a cell is the base's figure, the adapted one, and the paired difference with "
        "its 95 % bootstrap interval (items resampled whole). `kept`: whether `adapt`'s own "
        "check (a held-out part of the first half) accepted the map; when it did not, the "
        "written file is the base unchanged. `vestis-lite0` trained on most Luma products, so "
        "its Luma rows are in-shop; Lite0 rows show the method on a base that never saw "
        "either shop.",
        "",
        "| shop | base | seed | kept | queries | R@1 base → adapted (difference) "
        "| mAP base → adapted (difference) | time |",
        "|---|---|---:|---|---:|---|---|---:|",
    ]
    for row in rows:
        comparison = row["comparison"]
        cells = []
        for name in METRICS:
            low, high = comparison.intervals[name]
            cells.append(f"{comparison.metrics_b[name]:.3f} → {comparison.metrics_a[name]:.3f} "
                         f"({comparison.difference[name]:+.3f}, {low:+.2f} to {high:+.2f})")
        lines.append(f"| {row['shop']} | {row['base']} | {row['seed']} | "
                     f"{'yes' if row['kept'] else 'no'} | {row['queries']} | "
                     + " | ".join(cells) + f" | {row['seconds']:.0f} s |")
    lines += ["", "Mean R@1 difference over seeds (± standard deviation):"]
    for shop in dict.fromkeys(row["shop"] for row in rows):
        for base in dict.fromkeys(row["base"] for row in rows):
            gains = [r["comparison"].difference["R@1"] for r in rows
                     if r["shop"] == shop and r["base"] == base]
            spread = f" ± {np.std(gains, ddof=1):.3f}" if len(gains) > 1 else ""
            lines.append(f"- {shop}, {base}: {np.mean(gains):+.3f}{spread} "
                         f"({len(gains)} seeds)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shops", default=",".join(SHOPS))
    parser.add_argument("--bases", default="vestis-lite0,lite0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    args = parser.parse_args()
    rows = run(args.shops.split(","), args.bases.split(","),
               [int(seed) for seed in args.seeds.split(",")])
    lines = section(rows)
    print("\n".join(lines))
    if args.update:
        replace_section(args.update, lines)


if __name__ == "__main__":
    main()

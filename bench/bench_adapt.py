"""``vestis adapt`` measured: adapt on half of a shop's products, score the other half.

    python bench/bench_adapt.py [--seeds 0,1,2] [--bases vestis-lite0,lite0]
                                 [--folds runs/kfold/vestis-lite0] [--update BENCHMARKS.md]

For each shop and seed the products (Luma: by ``product``, so colours of one design stay
together; Bagisto: by item) are split in two halves. ``adapt`` sees only the first half
(holding out part of it for its own check); both the base and the written checkpoint are
then scored on the second half, whose products the adaptation never saw, leave-one-out by
item, with a paired bootstrap interval of the difference. A refused adaptation writes the
base unchanged, so its difference is exactly 0. Nothing here is shipped: the adapted files
are written to a temporary folder.

The shipped model trained on most Luma products, so its Luma rows are in-shop. ``--folds``
adds the fair version: each fold model of a k-fold run (``bench/kfold.py``) on the Luma
products its fold held out, which that model never saw, halved the same way (seed = fold).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

from vestis.evaluation import compare_results, load_dataset
from vestis.evaluation.run import bootstrap_groups, prepare_dataset, score_dataset
from vestis.models import Encoder
from vestis.train import load_config
from vestis.train.adapt import adapt
from vestis.train.sources import build_sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import publish_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHOPS = {"Luma": (DATA / "luma" / "catalog.csv", "product"),
         "Bagisto": (DATA / "bagisto" / "catalog.csv", "item_id")}
TITLE = "## Shop adaptation (`bench/bench_adapt.py`)"
METRICS = ("R@1", "mAP")


def read_rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as handle:
        return [{**row, "image": str(csv_path.parent / row["image"])}
                for row in csv.DictReader(handle)]


def halves(rows: list[dict], key: str, seed: int) -> tuple[list[dict], list[dict]]:
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


def score_half(models: list[str], half: Path):
    """The models on the photos of ``half`` (a CSV), leave-one-out by item, each photo read
    as ``vestis index`` stores it by default (``vestis eval`` with no flag)."""
    dataset = prepare_dataset(load_dataset(half))
    results = [score_dataset(Encoder.from_name(model), dataset, n_boot=0) for model in models]
    return compare_results(*results, bootstrap_groups(results[0], dataset))


def unseen_luma_rows(run: Path) -> list[dict]:
    """The Luma catalog rows of the products ``run``'s recipe held out (its model never saw
    them)."""
    _, validation = build_sources(load_config(run / "config.yaml"))
    held = {Path(sample.path).resolve() for split in validation if split.name == "luma"
            for sample in split.samples}
    return [row for row in read_rows(SHOPS["Luma"][0]) if Path(row["image"]).resolve() in held]


def run(shops: list[str], bases: list[str], seeds: list[int], folds: Path | None) -> list[dict]:
    cases = [(shop, seed, base, base, read_rows(SHOPS[shop][0]), SHOPS[shop][1])
             for shop in shops for seed in seeds for base in bases]
    for k, fold in enumerate(sorted(p for p in folds.glob("fold-*") if p.is_dir())
                             if folds else []):  # a run's fold models count as its seeds
        cases.append(("Luma, unseen products", k, str(fold / "last.pt"), _shown(str(folds)),
                      unseen_luma_rows(fold), "product"))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n, (shop, seed, base, kind, shop_rows, key) in enumerate(cases):
            first, second = halves(shop_rows, key, seed)
            source = write_csv(first, Path(folder) / f"{n}.csv")
            out = Path(folder) / f"{n}.pt"
            report = adapt(source, out, base=base, seed=seed, progress=False)
            comparison = score_half([str(out), base],
                                    write_csv(second, Path(folder) / f"{n}-second.csv"))
            rows.append({"shop": shop, "seed": seed, "base": _shown(base), "kind": kind,
                         "kept": report.kept, "map": report.map, "shares": report.shares,
                         "seconds": report.seconds, "queries": comparison.n_queries,
                         "comparison": comparison})
            print(f"{shop} seed {seed} {base}: {report.map} {report.shares}, R@1 "
                  f"{comparison.metrics_b['R@1']:.3f} -> {comparison.metrics_a['R@1']:.3f}",
                  file=sys.stderr)
    return rows


def _shown(base: str) -> str:
    path = Path(base)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) \
        else base


def section(rows: list[dict]) -> list[str]:
    lines = [
        TITLE,
        "",
        "Adapted on half of a shop's products (the first half of a seeded split), scored on "
        "the other half: products the adaptation never saw. Leave-one-out by item on that "
        "half; a cell is the base's figure, the adapted one, and the paired difference with "
        "its 95 % bootstrap interval (items resampled whole). `map`: what `adapt`'s own check "
        "(cross-validation over the first half's products) kept, `identity` when no map beat "
        "the base "
        "beyond the noise (the written file is then the base unchanged); `reweight` and "
        "`whiten` with the ImageNet share they chose, where the base blends ImageNet "
        "features. `vestis-lite0` trained on most Luma products, so its `Luma` rows are "
        "in-shop; the `Luma, unseen products` rows adapt each fold model of a k-fold run on "
        "half of the Luma products its fold held out and score the other half, products the "
        "base never saw; Lite0 rows show the method on a base that never saw either shop. "
        "Photos are read as `vestis index` stores them by default, by `adapt` and by the "
        "scoring alike (the garment a Luma photo's category names, in context; Bagisto "
        "has no category column, so its photos stay whole).",
        "",
        "| shop | base | seed | map | queries | R@1 base → adapted (difference) "
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
        share = row["shares"].get("imagenet")
        shown = row["map"] + (f" (ImageNet {share:.1f})" if row["kept"] and share is not None
                              else "")
        lines.append(f"| {row['shop']} | {row['base']} | {row['seed']} | {shown} | "
                     f"{row['queries']} | "
                     + " | ".join(cells) + f" | {row['seconds']:.0f} s |")
    lines += ["", "Mean R@1 difference over seeds (± standard deviation):"]
    for shop in dict.fromkeys(row["shop"] for row in rows):
        for base in dict.fromkeys(row["kind"] for row in rows if row["shop"] == shop):
            gains = [r["comparison"].difference["R@1"] for r in rows
                     if r["shop"] == shop and r["kind"] == base]
            spread = f" ± {np.std(gains, ddof=1):.3f}" if len(gains) > 1 else ""
            lines.append(f"- {shop}, {base}: {np.mean(gains):+.3f}{spread} "
                         f"({len(gains)} seeds)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shops", default=",".join(SHOPS))
    parser.add_argument("--bases", default="vestis-lite0,lite0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--folds", type=Path, help="A k-fold run of a recipe (its fold-* "
                        "folders): adds its fold models on their unseen Luma products.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--note", action="append", default=[],
                        help="A paragraph to print under the section (repeatable).")
    args = parser.parse_args()
    rows = run(args.shops.split(","), args.bases.split(","),
               [int(seed) for seed in args.seeds.split(",")], args.folds)
    publish_section(section(rows), args.note, args.update)


if __name__ == "__main__":
    main()

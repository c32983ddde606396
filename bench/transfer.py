"""Transfer: every model scored on the shops it never trained on, with 95 % intervals.

    python bench/transfer.py [--runs runs/bench] [--models lite0,lite2,vestis-lite0]
                             [--shop NAME=CSV ...] [--update BENCHMARKS.md] [--json out.json]
    python bench/transfer.py --kfold runs/kfold [--shop NAME=CSV ...] [--update BENCHMARKS.md]

Users index *their* shop, so a model is only as good as it is on photos unlike its training
data. Rows: the ImageNet baselines, the shipped default, and every trained recipe found in
``--runs`` (``RUN/best.pt``, or ``last.pt`` where the recipe ships its last epoch). Columns:
the two other shops of ``../shared/data`` (Bagisto, Solidus: no recipe trains on them), and
Luma and the clothing photos for the models that did not train on them (a checkpoint's
recipe says which sources it read). ``--shop NAME=CSV`` adds a catalog of your own (the
Luma CSV format, leave-one-out by ``item_id``). Every cell is ``vestis eval CSV --model M``
with no other flag: the metric and its bootstrap interval.

``--kfold DIR`` scores instead every recipe whose ``bench/kfold.py`` runs all finished in
DIR (each fold's ``last.pt``: as many trained seeds as folds) on the shops no recipe trains
on, beside the ImageNet baselines: a cell pools the per-query values of the recipe's fold
models, with a bootstrap interval that resamples an item's queries of every fold model
together, then the standard deviation over the fold models; ``vs lite0`` is the paired
difference to ImageNet Lite0 on the same queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vestis.artifacts import ARTIFACTS
from vestis.evaluation import EvalDataset, bootstrap_intervals, load_dataset
from vestis.evaluation.datasets import leave_one_out
from vestis.evaluation.run import bootstrap_groups, prepare_dataset, score_dataset
from vestis.models import Encoder
from vestis.records import ImageRecord
from vestis.train import load_config
from vestis.train.sources import build_sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kfold import pooled_summary  # noqa: E402
from recipes import CONFIGS, RECIPES, SCORED_CHECKPOINT, publish_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BASELINES = ("lite0", "lite2")
SHIPPED = "vestis-lite0"
TITLE = "## Transfer to other shops (`bench/transfer.py`)"
KFOLD_TITLE = "## Transfer over k-fold runs (`bench/transfer.py --kfold`)"
PAIRED = (("Bagisto", "R@1"), ("Bagisto", "mAP"), ("Solidus", "mAP"))


@dataclass(frozen=True)
class Shop:
    """A benchmark column: a CSV, which metrics it reports, and the training source (a
    recipe's ``kind``) that makes it in-shop rather than transfer."""

    name: str
    csv: Path
    metrics: tuple[str, ...]
    source_kind: str | None = None
    by_category: bool = False  # match photos by their category column (P@1 of the kind)


def default_shops() -> list[Shop]:
    return [
        Shop("Bagisto", DATA / "bagisto" / "catalog.csv", ("R@1", "R@10", "mAP")),
        Shop("Solidus", DATA / "solidus" / "catalog.csv", ("R@1", "mAP")),
        Shop("Solidus category", DATA / "solidus" / "catalog.csv", ("P@1",), by_category=True),
        Shop("Luma", DATA / "luma" / "catalog.csv", ("R@1", "mAP"), source_kind="luma"),
        Shop("clothing category", DATA / "clothing" / "labels.csv", ("P@1",),
             source_kind="clothing"),
    ]


def custom_shop(spec: str) -> Shop:
    name, _, path = spec.partition("=")
    if not name or not Path(path).is_file():
        raise SystemExit(f"--shop wants NAME=CSV with an existing CSV, got {spec!r}")
    return Shop(name, Path(path), ("R@1", "R@10", "mAP"))


def shop_dataset(shop: Shop, crop: str = "auto") -> EvalDataset:
    """The shop as ``vestis eval CSV --crop CROP`` reads it (``auto``: with no flag)."""
    if not shop.by_category:
        return prepare_dataset(load_dataset(shop.csv), crop=crop)
    with shop.csv.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] not in ("", "Other")]
    samples = [ImageRecord(shop.csv.parent / row["image"], row["category"],
                           category=row["category"]) for row in rows]
    dataset = leave_one_out(f"{shop.csv.parent.name} categories", samples)
    dataset.match = "category"
    return prepare_dataset(dataset, crop=crop)


def held_out_sets(recipe: Path, crop: str = "auto") -> dict[str, EvalDataset]:
    """The held-out splits of ``recipe`` (its seed and split), each leave-one-out, named
    ``"<source> held-out"``; clothing matches by category. Photos are read as ``vestis
    eval --crop CROP`` reads them (``auto``: with no flag)."""
    _, validation = build_sources(load_config(recipe))
    sets = {}
    for split in validation:
        dataset = leave_one_out(f"{split.name} held-out", list(split.samples))
        if split.name == "clothing":
            dataset.match = "category"
        sets[dataset.name] = prepare_dataset(dataset, crop=crop, progress=True)
    return sets


def trained_kinds(model: str) -> set[str]:
    """The data source kinds a model's recipe trained on (none for ImageNet weights)."""
    path = ARTIFACTS[model].path if model in ARTIFACTS else Path(model)
    if not path.is_file():
        return set()
    meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    sources = meta.get("recipe", {}).get("data", {}).get("sources", [])
    return {source["kind"] for source in sources if not source.get("validation_only")}


def recipe_runs(runs: Path) -> list[tuple[str, str]]:
    """``(row name, checkpoint)`` of every finished recipe run under ``runs``."""
    found = []
    for name in RECIPES:
        checkpoint = runs / name / SCORED_CHECKPOINT.get(name, "best.pt")
        if checkpoint.is_file():
            found.append((name, str(checkpoint)))
    return found


def score_models(models: list[tuple[str, str]], shops: list[Shop]) -> dict:
    """``{row: {shop: {metric: [value, low, high]} or "trained"}}``."""
    datasets = {shop.name: shop_dataset(shop) for shop in shops}
    table: dict[str, dict] = {}
    for row, model in models:
        kinds = trained_kinds(model)
        encoder = Encoder.from_name(model)
        cells = {}
        for shop in shops:
            if shop.source_kind in kinds:
                cells[shop.name] = "trained"
                continue
            result = score_dataset(encoder, datasets[shop.name])
            cells[shop.name] = {name: [result.metrics[name], *result.intervals[name]]
                                for name in shop.metrics}
            cells[shop.name]["queries"] = result.metrics["n_queries"]
            cells[shop.name]["tied"] = result.metrics["n_queries_tied"]
        table[row] = cells
        print(f"scored {row}", file=sys.stderr)
    return table


def section(table: dict, shops: list[Shop]) -> list[str]:
    headers = [f"{shop.name} {metric}" for shop in shops for metric in shop.metrics]
    queries = {shop.name: next((cells[shop.name]["queries"] for cells in table.values()
                                if isinstance(cells[shop.name], dict)), 0) for shop in shops}
    lines = [
        TITLE,
        "",
        "Each model on shops whose photos it never trained on, exactly as `vestis eval CSV "
        "--model M` scores them (with no flag: each photo by the garment its category names, "
        "in context, the whole photo where it names none; leave-one-out by item; category "
        "P@1 by the "
        "shop's category column, `Other` left out). A cell is the metric and its 95 % "
        "bootstrap interval (views of one item resampled together); `trained on` marks a shop "
        "the model's recipe trained on. Queries: "
        + ", ".join(f"{name} {count}" for name, count in queries.items()) + ". "
        "Bagisto and Solidus are small: intervals that overlap are not a ranking. Queries "
        f"whose first correct photo ties with a wrong one (where the tie rule counts): "
        f"{_tied(table)}.",
        "",
        "| model | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for row, cells in table.items():
        values = []
        for shop in shops:
            cell = cells[shop.name]
            for metric in shop.metrics:
                values.append("trained on" if cell == "trained" else interval_cell(*cell[metric]))
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return lines


def _tied(table: dict) -> int:
    return sum(cell["tied"] for cells in table.values() for cell in cells.values()
               if isinstance(cell, dict))


def kfold_models(root: Path) -> list[tuple[str, list[str]]]:
    """``(recipe, fold checkpoints)`` of every recipe in configs/ whose k-fold runs under
    ``root`` all finished (``bench/kfold.py`` writes ``RECIPE/fold-K/last.pt`` and
    ``fold-K.json``): the table's recipes first, then the others."""
    found = []
    others = sorted(path.name for path in root.iterdir()
                    if path.name not in RECIPES and (CONFIGS / f"{path.name}.yaml").exists())
    for name in [*RECIPES, *others]:
        saved = sorted((root / name).glob("fold-*.json"))
        if not saved:
            continue
        folds = json.loads(saved[0].read_text())["folds"]
        checkpoints = [root / name / f"fold-{k}" / "last.pt" for k in range(folds)]
        if all(checkpoint.is_file() for checkpoint in checkpoints):
            found.append((name, [str(checkpoint) for checkpoint in checkpoints]))
    return found


def per_query_scores(models: list[str], datasets: dict[str, EvalDataset]) -> dict:
    """``{set: {"values": {metric: pooled array}, "groups": [...], "model": [...]}}``: the
    per-query values of every model, queries of one item (of one query, for category sets)
    in one resampling group across the models."""
    pooled: dict[str, dict] = {}
    for index, model in enumerate(models):
        encoder = Encoder.from_name(model)
        for name, dataset in datasets.items():
            result = score_dataset(encoder, dataset, n_boot=0)
            groups = bootstrap_groups(result, dataset) or [f"query {i}"
                                                           for i in result.query_indices]
            entry = pooled.setdefault(name, {"values": {}, "groups": [], "model": []})
            for metric, values in result.per_query().items():
                entry["values"].setdefault(metric, []).extend(values)
            entry["groups"] += list(groups)
            entry["model"] += [index] * len(groups)
    return pooled


def pooled_cell(entry: dict, metric: str) -> str:
    pooled = pooled_summary(entry["values"][metric], entry["model"], entry["groups"])
    cell = interval_cell(pooled["mean"], pooled["low"], pooled["high"])
    return cell if np.isnan(pooled["fold_std"]) else f"{cell} ± {pooled['fold_std']:.3f}"


def paired_cell(entry: dict, reference: dict, metric: str) -> str:
    """``entry`` minus ``reference`` (one model, repeated for each of entry's models)."""
    repeats = len(set(entry["model"]))
    difference = (np.asarray(entry["values"][metric])
                  - np.tile(np.asarray(reference["values"][metric]), repeats))
    low, high = bootstrap_intervals({metric: difference}, entry["groups"])[metric]
    text = f"{difference.mean():+.3f} ({low:+.2f} to {high:+.2f})"
    return f"**{text}**" if low > 0 or high < 0 else text


def kfold_section(rows: dict[str, dict], shops: list[Shop], folds: dict[str, int]) -> list[str]:
    headers = [f"{shop.name} {metric}" for shop in shops for metric in shop.metrics]
    paired = [f"{name} {metric} vs lite0" for name, metric in PAIRED]
    reference = rows["ImageNet lite0"]
    queries = {shop.name: len(reference[shop.name]["groups"]) for shop in shops}
    lines = [
        KFOLD_TITLE,
        "",
        "Every recipe's k-fold runs (`K-fold recipe scores`: each fold's `last.pt`, trained "
        "on the other folds' Luma products and clothing contributors, so as many trained "
        "seeds as folds) on the shops no recipe trains on, scored as `vestis eval CSV --model "
        "M` scores them (with no flag: photos cropped to the garment their category names, "
        "none in Bagisto). A cell pools the per-query values of the recipe's "
        f"{'/'.join(map(str, sorted(set(folds.values()))))} fold models: the mean, its 95 % "
        "bootstrap interval (an item's queries resampled together across the fold models), "
        "then ± the standard deviation over the fold models. `vs lite0`: the paired "
        "difference to ImageNet Lite0 on the same queries; **bold** when its interval "
        "excludes 0. Queries per model: "
        + ", ".join(f"{name} {count}" for name, count in queries.items()) + ".",
        "",
        "| row | " + " | ".join(headers + paired) + " |",
        "|---|" + "---:|" * (len(headers) + len(paired)),
    ]
    for row, scores in rows.items():
        cells = [pooled_cell(scores[shop.name], metric) for shop in shops
                 for metric in shop.metrics]
        cells += ["" if row == "ImageNet lite0" else
                  paired_cell(scores[name], reference[name], metric) for name, metric in PAIRED]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def main_kfold(root: Path, shops: list[Shop]) -> list[str]:
    found = kfold_models(root)
    if not found:
        raise SystemExit(f"no recipe has all its k-fold runs under {root}")
    shops = [shop for shop in shops if shop.source_kind is None]
    datasets = {shop.name: shop_dataset(shop) for shop in shops}
    models = [(f"ImageNet {name}", [name]) for name in BASELINES] + found
    rows = {}
    for row, checkpoints in models:
        rows[row] = per_query_scores(checkpoints, datasets)
        print(f"scored {row}", file=sys.stderr)
    return kfold_section(rows, shops, {row: len(c) for row, c in found})


def interval_cell(mean: float, low: float, high: float) -> str:
    """A table cell: the figure and its interval."""
    return f"{mean:.3f} ({low:.2f}-{high:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench",
                        help="Folder of recipe runs (bench/recipes.py writes runs/bench).")
    parser.add_argument("--models", default=",".join((*BASELINES, SHIPPED)),
                        help="Registered models or checkpoints scored before the recipe runs.")
    parser.add_argument("--shop", action="append", default=[], metavar="NAME=CSV",
                        help="Another shop's catalog CSV (image,item_id), leave-one-out.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--json", type=Path, help="Also write the table as JSON.")
    parser.add_argument("--kfold", type=Path,
                        help="Score the k-fold runs in this folder instead (runs/kfold).")
    args = parser.parse_args()
    shops = default_shops() + [custom_shop(spec) for spec in args.shop]
    if args.kfold:
        publish_section(main_kfold(args.kfold, shops), [], args.update)
        return
    models = [(name, name) for name in args.models.split(",") if name]
    models += recipe_runs(args.runs)
    table = score_models(models, shops)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    publish_section(section(table, shops), [], args.update)


if __name__ == "__main__":
    main()

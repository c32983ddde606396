"""Garment crops at ingest over k-fold runs: whole photos against what ``vestis index`` crops.

    python bench/crops_kfold.py [--runs runs/kfold/vestis-lite0] [--update BENCHMARKS.md]

The question behind the default ``crop="auto"`` of ``vestis index`` and ``vestis eval``: does
indexing each photo by the garment its category names (in its photo's context; the whole
photo when the category names none) beat whole photos across shops and seeds? For each fold
of the shipped recipe's k-fold runs (``bench/kfold.py vestis-lite0``), the fold's model
scores the fold's held-out Luma products and clothing contributors and the two other shops,
each read as ``vestis eval`` reads it with ``--crop none``, ``--crop auto`` and (shops, where
``auto`` changes little) ``--crop largest``; ImageNet Lite0 and Lite2 score the same Luma
folds and shops. Per-query values are pooled over the folds; a difference is paired (the
same queries, an item's queries resampled together).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from vestis.evaluation import bootstrap_intervals
from vestis.evaluation.run import bootstrap_groups, prepare_dataset, score_dataset
from vestis.models import Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import publish_section  # noqa: E402
from transfer import interval_cell  # noqa: E402
from transfer_ablation import SETS, TRANSFER, _shown, eval_sets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TITLE = "## Garment crops at ingest over k-fold runs (`bench/crops_kfold.py`)"
BASELINES = ("lite0", "lite2")
IN_SHOP = "clothing held-out"  # scored for the trained model only (its in-shop goal)


def crop_modes(name: str) -> tuple[str, ...]:
    return ("none", "auto", "largest") if name in TRANSFER else ("none", "auto")


def fold_sets(run: Path, shops: dict) -> dict[str, dict[str, object]]:
    """``{set: {crop: dataset}}`` of one fold; the shops' (the same in every fold) reused."""
    out = {}
    for name, dataset in eval_sets(run / "config.yaml", crop="none").items():
        if name in TRANSFER:
            if name not in shops:
                shops[name] = {mode: prepare_dataset(dataset, crop=mode)
                               for mode in crop_modes(name)}
            out[name] = shops[name]
        else:
            out[name] = {mode: prepare_dataset(dataset, crop=mode, progress=True)
                         for mode in crop_modes(name)}
    return out


def score(model: str, sets: dict, fold: int, pooled: dict, names) -> None:
    """Add ``model``'s per-query values on ``names`` of one fold's ``sets`` to ``pooled``."""
    encoder = Encoder.from_name(model)
    for name in names:
        for mode, dataset in sets[name].items():
            add_values(pooled, (name, mode), score_dataset(encoder, dataset, n_boot=0),
                       dataset, fold)


def add_values(pooled: dict, key, result, dataset, fold: int) -> None:
    """Pool one fold's per-query values of ``result`` on ``dataset`` under ``key``, with
    their resampling groups (a query's item; category queries one by one)."""
    groups = bootstrap_groups(result, dataset) or [
        f"{fold}: query {i}" for i in result.query_indices]
    entry = pooled.setdefault(key, {"values": {}, "groups": []})
    for metric, values in result.per_query().items():
        entry["values"].setdefault(metric, []).extend(values)
    entry["groups"] += list(groups)


def difference_cell(entry: dict, base: dict, metric: str) -> str:
    difference = np.asarray(entry["values"][metric]) - np.asarray(base["values"][metric])
    low, high = bootstrap_intervals({metric: difference}, entry["groups"])[metric]
    text = f"{difference.mean():+.3f} ({low:+.3f} to {high:+.3f})"
    return f"**{text}**" if low > 0 or high < 0 else text


def value_cell(entry: dict, metric: str) -> str:
    values = np.asarray(entry["values"][metric])
    low, high = bootstrap_intervals({metric: values}, entry["groups"])[metric]
    return interval_cell(values.mean(), low, high)


def section(rows: dict[str, dict], runs: Path, folds: int) -> list[str]:
    lines = [
        TITLE, "",
        f"The {folds} fold models of `{_shown(runs)}` (the shipped recipe as "
        "served; each fold's held-out Luma products and clothing contributors are unseen by "
        "its model) and ImageNet Lite0 and Lite2 (Luma folds and the shops), each photo read "
        "as `vestis eval` reads it: `none` whole photos; `auto` (what `vestis index` and "
        "`vestis eval` do with no flag) the garment its category names, in its photo's "
        "context, and the whole photo where the category names none (Bagisto has no "
        "category column, so nothing changes there); `largest` the largest garment found, "
        "categories ignored (what `--crop garment` falls back to without a category). A cell "
        "pools the per-query values of the folds with its 95 % bootstrap interval; a "
        "difference is paired, **bold** when its interval excludes 0.",
        "",
        "| model | set | metric | none | auto | auto - none | largest | largest - none |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, pooled in rows.items():
        for name, metrics in SETS.items():
            if (name, "none") not in pooled:
                continue
            base = pooled[name, "none"]
            for metric in metrics:
                cells = [value_cell(base, metric)]
                for mode in ("auto", "largest"):
                    entry = pooled.get((name, mode))
                    cells += ([value_cell(entry, metric), difference_cell(entry, base, metric)]
                              if entry else ["", ""])
                lines.append(f"| {model} | {name} | {metric} | " + " | ".join(cells) + " |")
    return lines


def fold_arguments(description: str) -> tuple[argparse.Namespace, list[Path]]:
    """``--runs`` (a k-fold run of the shipped recipe), ``--update``, ``--note``; and the
    run's finished folds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=Path, default=REPO / "runs/kfold/vestis-lite0")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--note", action="append", default=[],
                        help="A paragraph to print under the section (repeatable).")
    args = parser.parse_args()
    runs = sorted(path for path in args.runs.glob("fold-*") if (path / "last.pt").is_file())
    if not runs:
        sys.exit(f"no finished fold under {args.runs} (python bench/kfold.py vestis-lite0)")
    return args, runs


def main() -> None:
    args, runs = fold_arguments(__doc__.splitlines()[0])
    shops: dict = {}
    rows: dict[str, dict] = {args.runs.name: {}, **{f"ImageNet {m}": {} for m in BASELINES}}
    for fold, run in enumerate(runs):
        sets = fold_sets(run, shops)
        score(str(run / "last.pt"), sets, fold, rows[args.runs.name], list(sets))
        for model in BASELINES:
            names = [name for name in sets if name != IN_SHOP and (
                name not in TRANSFER or fold == 0)]  # the shops: once, they are the same
            score(model, sets, fold, rows[f"ImageNet {model}"], names)
        print(f"scored fold {fold}", file=sys.stderr)
    publish_section(section(rows, args.runs, len(runs)), args.note, args.update)


if __name__ == "__main__":
    main()

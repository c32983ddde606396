"""K-fold scores of training recipes: every product held out once, mean ± spread, intervals.

    python bench/kfold.py RECIPE [RECIPE ...] [--folds 5] [--fold K] [--reuse] [--data DIR]
                          [--update BENCHMARKS.md] [--note TEXT ...]
    python bench/kfold.py --table [--update BENCHMARKS.md]   # the section from saved scores

Fold k of ``--folds`` K (``data.folds``/``data.fold`` in the recipe) holds out a K-th of the
Luma products and of the clothing contributors; the K runs of one recipe hold out each of
them exactly once, so every multi-view Luma item is a query once instead of one 20 % split.
Each fold's held-out photos are scored leave-one-out among themselves, as the trainer's
validation does, with the run's ``last.pt``: the recipe's fixed budget (``best.pt`` is chosen
on the very photos it would be scored on). The ImageNet rows embed the same folds. A recipe
that starts from another recipe's run (``model.init_from: runs/bench/NAME/...``, as
``video_finetune`` does) starts fold k from NAME's fold k.

Per row and metric: the mean over all folds' queries with its 95 % bootstrap interval (Luma:
whole items resampled), the per-fold mean ± standard deviation, and, since every row scores
the same queries, the paired difference to ImageNet Lite0. Per-query values are saved per
fold in ``runs/kfold/<row>/fold-K.json``; ``--table`` rebuilds the section from whatever is
saved there, so folds can run in parallel processes (``--fold K``, one per GPU process) and
on a shrunk copy of the photos (``--data DIR``, the layout of ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vestis.evaluation import bootstrap_intervals, retrieval_metrics
from vestis.models import Encoder
from vestis.train import load_config, train
from vestis.train.sources import build_sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import CONFIGS, publish_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "kfold"
BASELINES = ("lite0", "lite2")
REFERENCE = "ImageNet lite0"
TITLE = "## K-fold recipe scores (`bench/kfold.py`)"
# (split, metric, column title): Luma is instance retrieval, clothing category retrieval.
COLUMNS = (("luma", "R@1", "Luma R@1"), ("luma", "mAP", "Luma mAP"),
           ("clothing", "P@1", "clothing P@1"), ("clothing", "MAP@R", "clothing MAP@R"))
CATEGORY_SPLITS = ("clothing",)


def fold_config(recipe: Path, fold: int, folds: int, data: Path | None) -> dict:
    config = load_config(recipe, {"data": {"fold": fold, "folds": folds}})
    if data is not None:
        for source in config["data"]["sources"]:
            path = Path(source["path"])
            source["path"] = str(data / path.parent.name / path.name)
    start = config["model"].get("init_from")
    if start:
        config["model"]["init_from"] = str(fold_start(Path(start), fold))
    return config


def fold_start(start: Path, fold: int) -> Path:
    """A recipe that starts from another recipe's run (``runs/bench/NAME/best.pt``) starts
    each fold from that recipe's run of the same fold, never from a model chosen on another
    split's held-out photos."""
    name = start.parent.name
    if not (CONFIGS / f"{name}.yaml").exists():
        return start  # not a recipe's run: a file of the user's
    own = RUNS / name / f"fold-{fold}" / "last.pt"
    if not own.is_file():
        raise SystemExit(f"{name} starts from {start}: run `python bench/kfold.py {name}` "
                         "with the same --folds first")
    return own


def score_fold(encoder: Encoder, config: dict) -> dict:
    """Per-query values of every held-out split of one fold's config."""
    _, validation = build_sources(config)
    fold = config["data"]["fold"]
    scores = {}
    for split in validation:
        labels = [sample.item_id for sample in split.samples]
        vectors = encoder.embed([s.path for s in split.samples], [s.box for s in split.samples])
        result = retrieval_metrics(vectors, labels, vectors, labels, ks=(1, 10),
                                   query_gallery_index=np.arange(len(labels)))
        entry = {name: [float(v) for v in values] for name, values in result.per_query().items()}
        entry["fold"] = [fold] * len(result.query_indices)
        entry["group"] = [f"{fold}:{labels[i]}" for i in result.query_indices]
        scores[split.name] = entry
    return scores


def run_recipe(name: str, fold: int, folds: int, reuse: bool, data: Path | None) -> dict:
    config = fold_config(CONFIGS / f"{name}.yaml", fold, folds, data)
    out = RUNS / name / f"fold-{fold}"
    if not (reuse and (out / "last.pt").exists()):
        train(config, out, progress=True)
    return score_fold(Encoder.from_name(str(out / "last.pt")), config)


def save_scores(row: str, fold: int, folds: int, scores: dict) -> None:
    folder = RUNS / row.replace(" ", "-")
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"row": row, "fold": fold, "folds": folds, "scores": scores}
    (folder / f"fold-{fold}.json").write_text(json.dumps(payload))


def load_scores() -> dict[str, dict]:
    """``{row: {"folds": K, "scores": {split: per-query lists over its saved folds}}}``."""
    rows: dict[str, dict] = {}
    for path in sorted(RUNS.glob("*/fold-*.json")):
        saved = json.loads(path.read_text())
        row = rows.setdefault(saved["row"], {"folds": saved["folds"], "scores": {}, "done": 0})
        row["done"] += 1
        for split, entry in saved["scores"].items():
            merged = row["scores"].setdefault(split, {})
            for name, values in entry.items():
                merged.setdefault(name, []).extend(values)
    return {name: row for name, row in rows.items() if row["done"] == row["folds"]}


def summary(entry: dict, split: str, metric: str) -> dict:
    groups = None if split in CATEGORY_SPLITS else entry["group"]
    return pooled_summary(entry[metric], entry["fold"], groups)


def pooled_summary(values, runs, groups) -> dict:
    """Per-query ``values`` pooled over runs (``runs``: each value's run): the mean with its
    bootstrap interval (``groups`` resampled whole), and the per-run mean ± sd."""
    values, runs = np.asarray(values), np.asarray(runs)
    low, high = bootstrap_intervals({"value": values}, groups)["value"]
    per_run = [values[runs == k].mean() for k in np.unique(runs)]
    std = float(np.std(per_run, ddof=1)) if len(per_run) > 1 else float("nan")
    return {"mean": values.mean(), "low": low, "high": high,
            "fold_mean": float(np.mean(per_run)), "fold_std": std}


def paired(entry: dict, reference: dict, split: str, metric: str) -> tuple[float, float, float]:
    if entry["group"] != reference["group"]:
        raise ValueError("rows scored on different folds: rerun them with the same --folds")
    difference = np.asarray(entry[metric]) - np.asarray(reference[metric])
    groups = None if split in CATEGORY_SPLITS else entry["group"]
    low, high = bootstrap_intervals({metric: difference}, groups)[metric]
    return float(difference.mean()), low, high


def table(rows: dict[str, dict]) -> list[str]:
    reference = rows.get(REFERENCE)
    folds = {saved["folds"] for saved in rows.values()}
    counts = next(iter(rows.values()))["scores"]
    lines = [
        TITLE,
        "",
        f"{'/'.join(map(str, sorted(folds)))} folds over Luma products and clothing "
        "contributors (one seed): every Luma product and every contributor is held out once, "
        f"so the figures pool {len(counts['luma']['R@1'])} Luma queries (leave-one-out within "
        f"their fold's held-out photos) and {len(counts['clothing']['P@1'])} clothing ones. "
        "Each run is scored with its `last.pt` (the recipe's budget). A cell: mean over all "
        "queries, its 95 % bootstrap interval (Luma items resampled whole), then the per-fold "
        "mean ± standard deviation. `vs lite0`: the paired difference to ImageNet Lite0 on "
        "the same queries, with its interval; **bold** when the interval excludes 0.",
        "",
        "| row | " + " | ".join(title for _, _, title in COLUMNS) + " | Luma R@1 vs lite0 "
        "| clothing P@1 vs lite0 |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for row, saved in rows.items():
        scores = saved["scores"]
        cells = []
        for split, metric, _ in COLUMNS:
            s = summary(scores[split], split, metric)
            cells.append(f"{s['mean']:.3f} ({s['low']:.2f}-{s['high']:.2f}); "
                         f"{s['fold_mean']:.3f} ± {s['fold_std']:.3f}")
        for split, metric in (("luma", "R@1"), ("clothing", "P@1")):
            if reference is None or row == REFERENCE:
                cells.append("")
                continue
            mean, low, high = paired(scores[split], reference["scores"][split], split, metric)
            text = f"{mean:+.3f} ({low:+.2f} to {high:+.2f})"
            cells.append(f"**{text}**" if low > 0 or high < 0 else text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="Recipe names in configs/.")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, help="Run this fold only (default: all).")
    parser.add_argument("--reuse", action="store_true", help="Keep finished fold runs.")
    parser.add_argument("--data", type=Path, help="A copy of ../shared/data, same layout.")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="ImageNet models scored on the same folds ('' for none).")
    parser.add_argument("--table", action="store_true",
                        help="Only rebuild the section from saved scores.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--note", action="append", default=[],
                        help="A paragraph to print under the table (repeatable).")
    args = parser.parse_args()
    if not args.table:
        run(parser, args)
    rows = load_scores()
    if not rows:
        sys.exit(f"no row has all its folds scored under {RUNS}")
    lines = table(rows)
    publish_section(lines, args.note, args.update)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.recipes:
        parser.error("name at least one recipe, or use --table")
    missing = [name for name in args.recipes if not (CONFIGS / f"{name}.yaml").exists()]
    if missing:
        parser.error(f"no recipe in configs/ for: {', '.join(missing)}")
    folds = range(args.folds) if args.fold is None else [args.fold]
    first = CONFIGS / f"{args.recipes[0]}.yaml"
    for model in filter(None, args.baselines.split(",")):
        encoder = Encoder.from_name(model)
        for fold in folds:
            scores = score_fold(encoder, fold_config(first, fold, args.folds, args.data))
            save_scores(f"ImageNet {model}", fold, args.folds, scores)
    for name in args.recipes:
        for fold in folds:
            save_scores(name, fold, args.folds,
                        run_recipe(name, fold, args.folds, args.reuse, args.data))


if __name__ == "__main__":
    main()

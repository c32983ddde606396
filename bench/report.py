"""Regenerate BENCHMARKS.md: run the benchmarks and the baseline evaluation, side by side.

    python bench/report.py [--out BENCHMARKS.md] [--reuse-runs] [--only baseline,transfer,...]

Each section it makes replaces the same-titled section of the file (sections of other
scripts stay). The trained-recipes section alone: ``python bench/recipes.py --update
BENCHMARKS.md``; the transfer table alone: ``python bench/transfer.py --update
BENCHMARKS.md``; the k-fold table: ``python bench/kfold.py --table --update BENCHMARKS.md``;
the performance section alone: ``python bench/bench_perf.py --update BENCHMARKS.md``; the
scale section alone: ``python bench/bench_scale.py --update BENCHMARKS.md``.

Every figure in the file comes from a run on this machine; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from vestis.evaluation import evaluate
from vestis.evaluation.run import score_dataset
from vestis.models import Encoder
from vestis.train import load_config
from vestis.train.sources import build_sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_perf import replace_section as replace_perf_section  # noqa: E402
from bench_perf import run as perf_section  # noqa: E402
from kfold import load_scores  # noqa: E402
from kfold import table as kfold_table  # noqa: E402
from recipes import recipes_section, replace_section  # noqa: E402
from transfer import (  # noqa: E402
    default_shops,
    held_out_sets,
    interval_cell,
    recipe_runs,
    score_models,
)
from transfer import section as transfer_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def run_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


BASELINE_METRICS = ("R@1", "R@5", "R@10", "mAP", "MAP@R", "R-precision")


def baseline_section() -> list[str]:
    lines = [
        "## Retrieval quality: ImageNet baseline",
        "",
        "Leave-one-out on `../shared/data/luma/catalog.csv` (`vestis eval ... --model lite0`: "
        "each photo cropped to the garment its category names, in context); each figure with "
        "its 95 % bootstrap interval (views of one item resampled together).",
        "",
        "| model | " + " | ".join(BASELINE_METRICS) + " | queries | gallery |",
        "|---|" + "---:|" * (len(BASELINE_METRICS) + 2),
    ]
    for model in ("lite0", "lite1", "lite2"):
        result = evaluate(DATA / "luma" / "catalog.csv", model, progress=False)
        cells = [interval_cell(result.metrics[name], *result.intervals[name])
                 for name in BASELINE_METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {result.metrics['n_queries']} "
                     f"| {result.metrics['n_gallery']} |")
    return lines


HELD_OUT_METRICS = ("R@1", "mAP", "MAP@R", "R-precision")


def held_out_section(runs: Path = REPO / "runs" / "bench") -> list[str]:
    """The shipped default, the ImageNet models and every finished recipe run in ``runs``
    whose held-out splits are the default recipe's, on those splits, with intervals: what
    the single-split tables below are read against."""
    _, validation = build_sources(load_config(REPO / "configs" / "vestis-lite0.yaml"))
    recipes = [(name, checkpoint) for name, checkpoint in recipe_runs(runs)
               if name != "vestis-lite0" and same_splits(name, validation)]
    lines = [
        "## Held-out splits with intervals",
        "",
        "The held-out Luma products and clothing contributors of `configs/vestis-lite0.yaml` "
        "(seed 0), leave-one-out within each split, each photo cropped to the garment its "
        "category names as `vestis eval` does with no flag, scored with the fair tie rule; a "
        "cell is "
        "the figure and its 95 % bootstrap interval (Luma items resampled whole, clothing "
        "queries one by one). `tied`: queries whose first correct photo ties with a wrong one. "
        "Recipe rows (runs in `runs/bench` whose recipe holds out the same splits) are scored "
        "with the checkpoint `bench/recipes.py` scores.",
        "",
        "| model | split | queries | " + " | ".join(HELD_OUT_METRICS) + " | tied |",
        "|---|---|---:|" + "---:|" * (len(HELD_OUT_METRICS) + 1),
    ]
    models = [(name, name) for name in ("vestis-lite0", "lite0", "lite2")] + recipes
    sets = held_out_sets(REPO / "configs" / "vestis-lite0.yaml")  # as `vestis eval` crops
    for model, checkpoint in models:
        encoder = Encoder.from_name(checkpoint)
        for name, dataset in sets.items():
            result = score_dataset(encoder, dataset)
            cells = [interval_cell(result.metrics[metric], *result.intervals[metric])
                     for metric in HELD_OUT_METRICS]
            lines.append(f"| {model} | {name.removesuffix(' held-out')} | "
                         f"{result.metrics['n_queries']} | " + " | ".join(cells)
                         + f" | {result.metrics['n_queries_tied']} |")
    return lines


def same_splits(recipe: str, validation) -> bool:
    """Whether ``configs/RECIPE.yaml`` holds out exactly the photos of ``validation``."""
    _, own = build_sources(load_config(REPO / "configs" / f"{recipe}.yaml"))
    return _split_photos(own) == _split_photos(validation)


def _split_photos(splits) -> dict[str, list]:
    return {split.name: [(str(s.path), s.box, s.item_id) for s in split.samples]
            for split in splits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="Keep finished training runs in runs/bench instead of retraining.")
    parser.add_argument("--only", help=f"Comma-separated sections: {', '.join(SECTIONS)} "
                        "(default: all, with the header).")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    if not args.only:
        write_header(args.out, [
            "# Benchmarks",
            "",
            f"Generated by `python bench/report.py` on {datetime.date.today()}; {machine()}.",
            "The machine is shared and noisy: timings are medians of repeats.",
            CROP_RULE,
            TIE_RULE,
        ])
    for name in chosen:
        SECTIONS[name](args)
    print(f"wrote {args.out}")


CROP_RULE = (
    "Since 2026-12-07 `vestis index` and `vestis eval` crop each photo to the garment its "
    "category names by default (`--crop auto`; see `Garment crops at ingest over k-fold "
    "runs`). A section generated before then scored whole photos, as `--crop none` does now, "
    "unless it says otherwise; Bagisto has no category column, so its figures are the same "
    "either way."
)
TIE_RULE = (
    "Every quality figure counts ties at their expected value (README, \"Ties never help\"). "
    "Where this report counts ties (the `tied` counts of `Held-out splits with intervals` "
    "and `Transfer to other shops`), no query's first correct photo ties with a wrong one, so "
    "the rule moved none of those figures. The old "
    "rule inflated tied scores only: 20 identical photos labelled as 10 items of 2 scored R@1 "
    "1.0 under it and score 1/19 = 0.053 now "
    "(`tests/test_metrics.py::test_identical_vectors_score_at_chance`)."
)


def transfer(args: argparse.Namespace) -> None:
    shops = default_shops()
    models = [(name, name) for name in ("lite0", "lite2", "vestis-lite0")]
    models += recipe_runs(REPO / "runs" / "bench")
    replace_section(args.out, transfer_section(score_models(models, shops), shops))


def kfold(args: argparse.Namespace) -> None:
    rows = load_scores()
    if rows:
        replace_section(args.out, kfold_table(rows))


def eval_speed(args: argparse.Namespace) -> None:
    replace_section(args.out, code_section("## Evaluation speed (`bench/bench_eval.py`)", [
        run_script("bench/bench_eval.py"),
        run_script("bench/bench_eval.py", "--dim", "1280", "--repeats", "3")]))


def index_speed(args: argparse.Namespace) -> None:
    replace_section(args.out, code_section("## Indexing throughput (`bench/bench_index.py`)",
                                           [run_script("bench/bench_index.py")]))


def scale(args: argparse.Namespace) -> None:
    from bench_scale import section_from_runs  # Ray is imported only for this section

    section_from_runs(update=args.out)


def performance(args: argparse.Namespace) -> None:
    perf = argparse.Namespace(only=None, quick=False, repeats=3, note=None, dim=None)
    replace_perf_section(args.out, perf_section(perf))


SECTIONS = {
    "baseline": lambda args: replace_section(args.out, baseline_section()),
    "heldout": lambda args: replace_section(args.out, held_out_section()),
    "recipes": lambda args: replace_section(args.out, recipes_section(reuse=args.reuse_runs)),
    "transfer": transfer,
    "kfold": kfold,
    "eval": eval_speed,
    "index": index_speed,
    "performance": performance,
    "scale": scale,
}


def code_section(title: str, outputs: list[str]) -> list[str]:
    lines = [title, ""]
    for output in outputs:
        lines += ["```", output, "```", ""]
    return lines[:-1]


def write_header(path: Path, header: list[str]) -> None:
    """The lines before the first section, replaced; the sections kept."""
    lines = path.read_text().splitlines() if path.exists() else []
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    path.write_text("\n".join([*header, "", *lines[first:]]) + "\n")


if __name__ == "__main__":
    main()

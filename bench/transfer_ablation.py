"""A candidate model against a base, paired, on every set the issue's goals name.

    python bench/transfer_ablation.py CANDIDATE... [--base vestis-lite0] [--names A,B]
                                      [--recipe configs/vestis-lite0.yaml]
                                      [--update BENCHMARKS.md]

What training changes do to transfer and to the in-shop goals, measured on the same
queries for both models: Bagisto and Solidus (shops no recipe trains on; leave-one-out by
item, and Solidus by category), and the held-out Luma products and clothing contributors
of ``--recipe`` (its seed and split: train the candidate with the same ``seed`` and
``data`` so that both models held out the same photos). Photos as ``vestis eval`` reads
them with no flag (cropped to the garment their category names), the fair tie rule.
Every cell is a metric with its 95 % bootstrap interval; the difference is candidate minus
base with a paired interval (items resampled whole; clothing queries one by one). ``~``
marks a difference whose interval contains 0: not a win or a loss. The ImageNet models are
scored beside them on the transfer sets, the bar the default must clear (issue goals:
R@1 and mAP at least the better ImageNet model + 0.05 on other shops).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vestis.evaluation import EvalDataset, bootstrap_intervals
from vestis.evaluation.run import bootstrap_groups, score_dataset
from vestis.evaluation.uncertainty import compare_results
from vestis.models import Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import replace_section  # noqa: E402
from transfer import (  # noqa: E402
    default_shops,
    held_out_sets,
    interval_cell,
    shop_dataset,
)

REPO = Path(__file__).resolve().parents[1]
TITLE = "## Transfer ablations (`bench/transfer_ablation.py`)"
BASELINES = ("lite0", "lite2")
SETS = {  # set name → metrics reported
    "Bagisto": ("R@1", "mAP"),
    "Solidus": ("R@1", "mAP"),
    "Solidus category": ("P@1",),
    "luma held-out": ("R@1", "mAP"),
    "clothing held-out": ("P@1", "mAP"),
}
#: One table column per set and metric of :data:`SETS`, in order.
SET_COLUMNS = [(name, metric) for name, metrics in SETS.items() for metric in metrics]


def set_table_head(first: str, first_align: str = "---") -> list[str]:
    """The two header lines of a table whose rows start with ``first`` and whose other
    columns are :data:`SET_COLUMNS` (right-aligned)."""
    return [f"| {first} | " + " | ".join(f"{name} {metric}" for name, metric in SET_COLUMNS)
            + " |", f"|{first_align}|" + "---:|" * len(SET_COLUMNS)]
TRANSFER = ("Bagisto", "Solidus", "Solidus category")


def eval_sets(recipe: Path, crop: str = "auto") -> dict[str, EvalDataset]:
    """The transfer shops and ``recipe``'s held-out splits, read as ``vestis eval --crop
    CROP`` reads them (``auto``: with no flag)."""
    shops = {shop.name: shop_dataset(shop, crop) for shop in default_shops()
             if shop.name in TRANSFER}
    return {**shops, **held_out_sets(recipe, crop)}


def score(model: str, sets: dict[str, EvalDataset], names) -> dict:
    encoder = Encoder.from_name(model)
    return {name: score_dataset(encoder, sets[name], n_boot=0) for name in names}


def section(candidates: dict[str, str], base: str, results: dict, sets: dict,
            recipe: Path) -> list[str]:
    """``candidates``: table name → model."""
    names = ", ".join(f"`{name}` (`{model}`)" for name, model in candidates.items())
    lines = [
        TITLE, "",
        f"Candidates {names} against the base `{base}`, on the same queries; the held-out "
        f"splits are those of `{_shown(recipe)}`. A cell is the metric and its 95 % bootstrap "
        "interval; a candidate's cell adds its difference from the base with a paired "
        "interval (`~`: inside the noise, not a win or a loss). ImageNet columns: transfer "
        "sets only.",
        "",
        "| set | metric | queries | lite0 | lite2 | base | "
        + " | ".join(candidates) + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(candidates),
    ]
    for set_name, metrics in SETS.items():
        b = results[base][set_name]
        groups = bootstrap_groups(b, sets[set_name])
        paired = {name: compare_results(results[model][set_name], b, groups)
                  for name, model in candidates.items()}
        for metric in metrics:
            cells = [_cell(results[m].get(set_name), metric, groups) for m in BASELINES]
            cells.append(_cell(b, metric, groups))
            for name, model in candidates.items():
                low, high = paired[name].intervals[metric]
                mark = " ~" if low <= 0 <= high else ""
                cells.append(f"{_cell(results[model][set_name], metric, groups)}; "
                             f"{paired[name].difference[metric]:+.3f} ({low:+.2f} to "
                             f"{high:+.2f}){mark}")
            lines.append(f"| {set_name} | {metric} | {b.metrics['n_queries']} | "
                         + " | ".join(cells) + " |")
    return lines


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_absolute() and path.is_relative_to(REPO) else path


def _cell(result, metric: str, groups) -> str:
    if result is None:
        return "-"
    low, high = bootstrap_intervals(result.per_query(), groups)[metric]
    return interval_cell(result.metrics[metric], low, high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="+", help="Checkpoints or registered models.")
    parser.add_argument("--base", default="vestis-lite0")
    parser.add_argument("--names", help="Comma-separated names of the candidates.")
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "vestis-lite0.yaml")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else args.candidates
    if len(names) != len(args.candidates):
        raise SystemExit("--names needs one name per candidate")
    candidates = dict(zip(names, args.candidates, strict=True))
    sets = eval_sets(args.recipe)
    results = {model: score(model, sets, SETS) for model in (*args.candidates, args.base)}
    results.update({model: score(model, sets, TRANSFER) for model in BASELINES})
    lines = section(candidates, args.base, results, sets, args.recipe)
    print("\n".join(lines))
    if args.update:
        replace_section(args.update, lines)


if __name__ == "__main__":
    main()

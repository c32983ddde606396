"""The trained model blended with its own ImageNet features, weight chosen leave-one-shop-out.

    python bench/imagenet_blend.py [--model vestis-lite0] [--weights 0,0.1,...,0.9]
                                   [--recipe configs/vestis-lite0.yaml] [--save PATH]
                                   [--update BENCHMARKS.md] [--note TEXT ...]

``RetrievalNet.blend_imagenet(w)`` concatenates the backbone's own ImageNet vector (a frozen
copy of the weight package's stages from the fine-tuned one up, average-pooled head map) to
the trained vector, so cosine similarity is ``w`` x ImageNet's + ``(1 - w)`` x the trained
one's. The model is embedded once with the blend on and each weight re-weights its two
parts, which is exactly what the model at that weight returns. Sets: Bagisto and Solidus
(no recipe trains on them) and the held-out Luma products and clothing contributors of
``--recipe``; whole photos, leave-one-out, the fair tie rule, 95 % bootstrap intervals.

The weight is chosen leave-one-shop-out: among the weights that keep the in-shop goals
(held-out Luma R@1 >= 0.60 and mAP >= 0.62, clothing P@1 >= 0.80), each transfer shop gets
the weight that maximises the *other* shop's mean of R@1 and mAP, so no shop scores a weight
chosen on itself. ``--save`` writes the model at the weight both shops agree on (or the
smaller of the two) as a checkpoint usable with ``--model``.

``--runs DIR ...`` repeats the sweep over several trained runs of one recipe (each folder's
``last.pt`` on its own held-out splits from its ``config.yaml``; for example the folds of
``bench/kfold.py``, ``runs/kfold/vestis-lite0/fold-*``) and writes a second section: per
weight, the mean ± standard deviation over the runs, and per run the weight each shop
prefers, so that what the weight buys and costs is seen across trained seeds, not on one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from vestis.evaluation import bootstrap_intervals, retrieval_metrics
from vestis.evaluation.run import bootstrap_groups, embed_dataset
from vestis.evaluation.uncertainty import compare_results
from vestis.models import Encoder, create_model, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import publish_section  # noqa: E402
from transfer import interval_cell  # noqa: E402
from transfer_ablation import SET_COLUMNS, SETS, TRANSFER, eval_sets, set_table_head  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TITLE = "## ImageNet blend (`bench/imagenet_blend.py`)"
RUNS_TITLE = "## ImageNet blend over trained runs of {recipe} (`bench/imagenet_blend.py --runs`)"
PROBE = 0.5  # the weight the parts are embedded at; any weight in (0, 1) gives the same parts
IN_SHOP_GOALS = (("luma held-out", "R@1", 0.60), ("luma held-out", "mAP", 0.62),
                 ("clothing held-out", "P@1", 0.80))
SHOPS = ("Bagisto", "Solidus")


def blended(model: str, weight: float):
    """``model`` with the ImageNet blend at ``weight``, sharing the stages below its first
    fine-tuned one (``finetune_from_stage`` of its recipe, else the whole network)."""
    net = create_model(model)
    recipe = getattr(net, "checkpoint_meta", {}).get("recipe", {})
    net.blend_imagenet(weight, recipe.get("model", {}).get("finetune_from_stage") or 0)
    return net


def embed_parts(net, sets: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per set: query and gallery vectors of ``net`` (blended at :data:`PROBE`)."""
    encoder = Encoder(net)
    return {name: embed_dataset(encoder, dataset) for name, dataset in sets.items()}


def reweight(vectors: np.ndarray, trained_dim: int, weight: float) -> np.ndarray:
    """The vectors the model returns at ``weight``, from those at :data:`PROBE`."""
    width = vectors.shape[1] - trained_dim
    return np.hstack([vectors[:, :width] * (weight / PROBE) ** 0.5,
                      vectors[:, width:] * ((1 - weight) / (1 - PROBE)) ** 0.5])


def score(dataset, queries: np.ndarray, gallery: np.ndarray):
    result = retrieval_metrics(queries, dataset.query_ids, gallery, dataset.gallery_ids,
                               query_gallery_index=dataset.query_gallery_index)
    result.intervals = bootstrap_intervals(result.per_query(), bootstrap_groups(result, dataset))
    return result


def sweep(parts: dict, sets: dict, trained_dim: int, weights: list[float]) -> dict[float, dict]:
    """``{weight: {set: result}}``."""
    return {weight: {name: score(sets[name], reweight(queries, trained_dim, weight),
                                 reweight(gallery, trained_dim, weight))
                     for name, (queries, gallery) in parts.items()}
            for weight in weights}


def keeps_in_shop_goals(results: dict) -> bool:
    return all(results[name].metrics[metric] >= goal for name, metric, goal in IN_SHOP_GOALS)


def shop_score(results: dict, shop: str) -> float:
    return (results[shop].metrics["R@1"] + results[shop].metrics["mAP"]) / 2


def leave_one_shop_out(table: dict[float, dict]) -> dict[str, float]:
    """Per transfer shop: the weight chosen on the other shop among those keeping the goals
    (none when no weight keeps them)."""
    feasible = [w for w, results in table.items() if keeps_in_shop_goals(results)]
    chosen = {}
    if not feasible:
        return chosen
    for shop in SHOPS:
        other = next(s for s in SHOPS if s != shop)
        chosen[shop] = max(feasible, key=lambda w: (shop_score(table[w], other), -w))
    return chosen


def baselines(sets: dict) -> dict[str, dict]:
    out = {}
    for model in ("lite0", "lite2"):
        encoder = Encoder.from_name(model)
        out[model] = {name: score(sets[name], *embed_dataset(encoder, sets[name]))
                      for name in TRANSFER}
    return out


def cell(result, metric: str) -> str:
    return interval_cell(result.metrics[metric], *result.intervals[metric])


def paired(a, b, dataset, metric: str) -> str:
    """``a - b`` on the same queries, with its paired interval; ``~`` when it holds 0."""
    comparison = compare_results(a, b, bootstrap_groups(a, dataset))
    low, high = comparison.intervals[metric]
    return (f"{comparison.difference[metric]:+.3f} ({low:+.2f} to {high:+.2f})"
            + (" ~" if low <= 0 <= high else ""))


def section(model: str, table: dict, chosen: dict, imagenet: dict, recipe: Path,
            sets: dict) -> list[str]:
    weights = list(table)
    lines = [
        TITLE, "",
        f"`{model}` with its ImageNet features blended in at weight w (cosine similarity "
        "w x ImageNet Lite0's + (1 - w) x the trained vector's; w = 0 is the trained vector "
        "alone, the model before the blend). Held-out splits: those of "
        f"`{recipe.relative_to(REPO)}`. A cell is the metric and its 95 % bootstrap "
        "interval. `goals`: whether the in-shop goals hold "
        "(held-out Luma R@1 >= 0.60 and mAP >= 0.62, clothing P@1 >= 0.80).",
        "",
        "| w | goals | " + " | ".join(f"{s} {m}" for s, ms in SETS.items() for m in ms) + " |",
        "|---:|---|" + "---:|" * sum(len(ms) for ms in SETS.values()),
    ]
    for weight in weights:
        results = table[weight]
        cells = [cell(results[s], m) for s, ms in SETS.items() for m in ms]
        lines.append(f"| {weight:g} | {'yes' if keeps_in_shop_goals(results) else 'no'} | "
                     + " | ".join(cells) + " |")
    for name, results in imagenet.items():
        cells = [cell(results[s], m) if s in results else "-" for s, ms in SETS.items()
                 for m in ms]
        lines.append(f"| ImageNet {name} | - | " + " | ".join(cells) + " |")
    lines += ["", "Leave-one-shop-out choice (the weight chosen on the other shop, among "
              "those keeping the in-shop goals):"
              + ("" if chosen else " none, no weight keeps the in-shop goals.")]
    for shop, weight in chosen.items():
        results = table[weight]
        versus = "; ".join(
            f"{m} {paired(results[shop], imagenet[b][shop], sets[shop], m)} against {b}"
            for b in imagenet for m in ("R@1", "mAP"))
        lines.append(f"- {shop}: w = {weight:g} → R@1 {cell(results[shop], 'R@1')}, mAP "
                     f"{cell(results[shop], 'mAP')} (trained vector alone: "
                     f"{table[0.0][shop].metrics['R@1']:.3f} / "
                     f"{table[0.0][shop].metrics['mAP']:.3f}). Paired differences: {versus}.")
    return lines


def run_sweep(run: Path, weights: list[float]) -> tuple[dict, dict]:
    """The sweep of one training run folder: its ``last.pt`` on its own held-out splits."""
    sets = eval_sets(run / "config.yaml")
    net = blended(str(run / "last.pt"), PROBE)
    trained_dim = net.output_dim - net.imagenet.num_features
    return sweep(embed_parts(net, sets), sets, trained_dim, weights), sets


def spread_cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def runs_section(runs: list[Path], tables: list[dict], imagenet: dict) -> list[str]:
    """Per weight, every set's metric as mean ± sd over ``runs``; each run's choice."""
    weights = list(tables[0])
    columns = SET_COLUMNS
    queries = {s: sorted({len(table[0.0][s].query_indices) for table in tables})
               for s, _ in columns}
    recipes = sorted({run.resolve().parent.name for run in runs})
    lines = [
        RUNS_TITLE.format(recipe=", ".join(recipes)), "",
        f"The sweep of `ImageNet blend` repeated on {len(runs)} trained runs of one recipe "
        f"({', '.join(f'`{_shown(run)}`' for run in runs)}), each scored with its `last.pt` "
        "on its own held-out photos (so the held-out columns differ per run) and on the same "
        "transfer shops. A cell: mean ± standard deviation over the runs. Queries per run: "
        + ", ".join(f"{s} {'/'.join(map(str, n))}" for s, n in queries.items()) + ".",
        "",
        *set_table_head("w", "---:"),
    ]
    for weight in weights:
        cells = [spread_cell([table[weight][s].metrics[m] for table in tables])
                 for s, m in columns]
        lines.append(f"| {weight:g} | " + " | ".join(cells) + " |")
    for name, results in imagenet.items():
        cells = [f"{results[s].metrics[m]:.3f}" if s in results else "-" for s, m in columns]
        lines.append(f"| ImageNet {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per run, the weight that scores best on each shop (mean of R@1 and mAP, "
              "chosen on the shop itself, so a description, not a choice) and the weights "
              "at which that run's held-out photos keep the in-shop goals (the goals are "
              "set for the benchmark split's held-out fifth of Luma; a fold holds out a "
              "larger share, so its gallery is larger and its figures lower):"]
    for run, table in zip(runs, tables, strict=True):
        best = ", ".join(f"{shop} w = {max(table, key=lambda w: shop_score(table[w], shop)):g}"
                         for shop in SHOPS)
        goals = [w for w, results in table.items() if keeps_in_shop_goals(results)]
        lines.append(f"- `{_shown(run)}`: {best}; goals kept at w = "
                     + (", ".join(f"{w:g}" for w in goals) or "none") + ".")
    return lines


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vestis-lite0")
    parser.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "vestis-lite0.yaml")
    parser.add_argument("--save", type=Path, help="Write the blended model at the chosen w.")
    parser.add_argument("--runs", type=Path, nargs="+",
                        help="Sweep these training run folders (last.pt, config.yaml) instead, "
                             "with the spread over them.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--note", action="append", default=[],
                        help="A paragraph to print under the section (repeatable).")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    if 0.0 not in weights:
        parser.error("--weights must include 0 (the trained vector alone)")
    if args.runs:
        return main_runs(args, weights)
    sets = eval_sets(args.recipe)
    net = blended(args.model, PROBE)
    trained_dim = net.output_dim - net.imagenet.num_features
    table = sweep(embed_parts(net, sets), sets, trained_dim, weights)
    chosen = leave_one_shop_out(table)
    lines = section(args.model, table, chosen, baselines(sets), args.recipe.resolve(),
                    sets)
    publish_section(lines, args.note, args.update)
    if args.save:
        if not chosen:
            sys.exit("not saved: no weight keeps the in-shop goals")
        weight = min(chosen.values())
        net.blend_imagenet(weight, net.imagenet_from_stage)
        save_checkpoint(net, args.save, include_backbone=True, half=True,
                        meta={**getattr(net, "checkpoint_meta", {}), "imagenet_weight": weight})
        print(f"wrote {args.save} (w = {weight:g})")


def main_runs(args: argparse.Namespace, weights: list[float]) -> None:
    missing = [run for run in args.runs
               if not ((run / "last.pt").is_file() and (run / "config.yaml").is_file())]
    if missing:
        sys.exit(f"not a finished training run (last.pt and config.yaml): {missing[0]}")
    swept = [run_sweep(run, weights) for run in args.runs]
    lines = runs_section(args.runs, [table for table, _ in swept], baselines(swept[0][1]))
    publish_section(lines, args.note, args.update)


if __name__ == "__main__":
    main()

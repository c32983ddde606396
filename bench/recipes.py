"""Train every method recipe on the same data and budget; compare them on held-out splits.

    python bench/recipes.py [--reuse]

Each recipe in RECIPES is trained into ``runs/bench/<recipe>`` (``--reuse`` keeps a finished
run). Every row is scored on the validation splits its recipe holds out: Luma products and
clothing contributors (``sender_id``) never seen in training. The ImageNet row embeds the same
splits with plain Lite0. Clothing P@1 is category retrieval, leave-one-out.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
from pathlib import Path

import torch

from vestis.models import Encoder
from vestis.train import load_config, train
from vestis.train.sources import build_sources
from vestis.train.trainer import split_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = ("triplet", "os_is", "htl", "vestis-lite0")
# The shipped default is the last epoch of its cosine schedule (scripts/ship_model.py
# runs/bench/vestis-lite0/last.pt); the method rows use their best validation epoch.
SCORED_CHECKPOINT = {"vestis-lite0": "last.pt"}
COLUMNS = ("luma_R@1", "luma_R@10", "luma_mAP", "clothing_R@1", "clothing_MAP@R")


def hardware() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{device}, {os.cpu_count()} cores ({platform.machine()})"


def run_recipe(name: str, reuse: bool) -> tuple[dict[str, float], float]:
    out = REPO / "runs" / "bench" / name
    if not (reuse and (out / "best.pt").exists()):
        train(CONFIGS / f"{name}.yaml", out, progress=True)
    checkpoint = out / SCORED_CHECKPOINT.get(name, "best.pt")
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    with open(out / "log.csv", newline="") as handle:
        seconds = float(list(csv.DictReader(handle))[-1]["seconds"])
    return meta["metrics"], seconds


def baseline_metrics(recipe: str, model: str = "lite0") -> dict[str, float]:
    """Plain ImageNet features on the same held-out splits the recipes are scored on."""
    _, validation = build_sources(load_config(CONFIGS / f"{recipe}.yaml"))
    encoder = Encoder.from_name(model)
    metrics: dict[str, float] = {}
    for split in validation:
        vectors = encoder.embed([s.path for s in split.samples], [s.bbox for s in split.samples])
        metrics.update(split_metrics(vectors, split))
    return metrics


def row(name: str, metrics: dict[str, float], seconds: float | None) -> str:
    cells = " | ".join(f"{metrics[key]:.4f}" for key in COLUMNS)
    minutes = "0 (no training)" if seconds is None else f"{seconds / 60:.1f} min"
    return f"| {name} | {cells} | {minutes} | {hardware()} |"


def recipes_section(reuse: bool) -> list[str]:
    lines = [
        "## Trained recipes (`bench/recipes.py`)",
        "",
        "Same data (Luma + all clothing photos), same held-out splits and the same budget (at "
        "most 60 minutes on this CPU, feature caching included) for every recipe. The method "
        "recipes train heads on frozen Lite0 features (30 epochs); the shipped default also "
        "fine-tunes Lite0's stages 5-6 on cached stage-4 maps. Held out: Luma products "
        "(`split_by: product`, leave-one-out by item) and clothing contributors (`split_by: "
        "sender_id`, category P@1 = R@1 leave-one-out). Training time includes feature caching "
        "unless an earlier recipe already cached the same features (the method recipes share "
        "one cache).",
        "",
        "| recipe | Luma R@1 | Luma R@10 | Luma mAP | clothing P@1 | clothing MAP@R "
        "| training time | hardware |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        row("ImageNet lite0", baseline_metrics(RECIPES[0]), None),
    ]
    for name in RECIPES:
        metrics, seconds = run_recipe(name, reuse)
        lines.append(row(name, metrics, seconds))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="Keep finished runs in runs/bench.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    args = parser.parse_args()
    section = recipes_section(args.reuse)
    print("\n".join(section))
    if args.update:
        replace_section(args.update, section)


def replace_section(path: Path, section: list[str]) -> None:
    """Swap the recipes section of an existing report (or append it), keeping the rest."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", ""]
    title = section[0]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = [*section, ""]
    else:
        lines += ["", *section]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

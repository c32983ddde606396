"""Train every method recipe on the same data and budget; compare them on held-out splits.

    python bench/recipes.py [--reuse] [--recipes triplet,os_is] [--update BENCHMARKS.md]

Each recipe in RECIPES is trained into ``runs/bench/<recipe>`` (``--reuse`` keeps a finished
run). Every row is scored on the validation splits its recipe holds out: Luma products and
clothing contributors (``sender_id``) never seen in training. The ImageNet row embeds the same
splits with plain Lite0. Clothing P@1 is category retrieval, leave-one-out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
from datetime import date
from pathlib import Path

import torch

from vestis.models import Encoder, create_model
from vestis.train import load_config, train
from vestis.train.sources import build_sources
from vestis.train.trainer import split_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# video_triplet (stage 1, no labels) must come before video_finetune (stage 2 starts from it).
RECIPES = ("triplet", "video_triplet", "video_finetune", "os_is", "htl", "bier", "hdc",
           "m_heads", "abe_m", "impdrop", "sc_capsnet", "rc_capsnet", "fashionnet", "vestis-lite0")
# The shipped default is the last epoch of its cosine schedule (scripts/ship_model.py
# runs/bench/vestis-lite0/last.pt); the method rows use their best validation epoch.
SCORED_CHECKPOINT = {"vestis-lite0": "last.pt"}
VIDEO_CLIPS, VIDEO_CROPS = REPO / "runs" / "video-clips", REPO / "runs" / "video-crops"
COLUMNS = ("luma_R@1", "luma_R@10", "luma_mAP", "clothing_R@1", "clothing_MAP@R")


def hardware() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{device}, {os.cpu_count()} cores ({platform.machine()})"


def run_recipe(name: str, reuse: bool) -> tuple[dict[str, float], float, str]:
    out = REPO / "runs" / "bench" / name
    if not (reuse and (out / "best.pt").exists()):
        train(CONFIGS / f"{name}.yaml", out, progress=True)
    checkpoint = out / SCORED_CHECKPOINT.get(name, "best.pt")
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    with open(out / "log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    return meta["metrics"], float(log[-1]["seconds"]), training_summary(meta["recipe"], len(log))


def training_summary(recipe: dict, epochs: int) -> str:
    """Which backbone parts were trained, and for how many epochs."""
    model = recipe["model"]
    cut = model.get("finetune_from_stage")
    if not model.get("freeze_backbone", False):
        trained = "whole backbone"
    elif model.get("architecture") == "impdrop_net":
        last = cut + model.get("branch_stages", 2) - 1
        trained = f"attention branch's copy of stages {cut}-{last}"
    elif cut is None:
        trained = "heads on a frozen backbone"
    elif cut >= 7:
        trained = "head conv fine-tuned"
    else:
        trained = f"stages {cut}-6 + head conv fine-tuned"
    return f"{trained}, {epochs} epochs{_pretraining(recipe)}"


def _pretraining(recipe: dict) -> str:
    """What a recipe trains on without labels, or starts from."""
    if recipe["loss"].get("name") == "video_triplet":
        return ", unlabelled synthetic clips only"
    model = recipe["model"]
    steps = [text for key, text in (
        ("attention_pretrain", ", attention pre-trained on CCP person/garment masks"),
        ("landmark_pretrain", ", landmark branch pre-trained on landmarks from CCP masks"),
    ) if model.get(key)]
    start = model.get("init_from")
    return "".join(steps) + (f", started from {Path(start).parent.name}" if start else "")


def baseline_metrics(recipe: str, model: str = "lite0") -> dict[str, float]:
    """``model`` (default: plain ImageNet features) on the same held-out splits the recipes
    are scored on."""
    _, validation = build_sources(load_config(CONFIGS / f"{recipe}.yaml"))
    encoder = Encoder.from_name(model)
    metrics: dict[str, float] = {}
    for split in validation:
        vectors = encoder.embed([s.path for s in split.samples], [s.box for s in split.samples])
        metrics.update(split_metrics(vectors, split))
    return metrics


def row(name: str, metrics: dict[str, float], seconds: float | None, summary: str) -> str:
    cells = " | ".join(f"{metrics[key]:.4f}" for key in COLUMNS)
    minutes = "0" if seconds is None else f"{seconds / 60:.1f} min"
    return f"| {name} | {cells} | {summary} | {minutes} |"


def recipes_section(reuse: bool, recipes: tuple[str, ...] = RECIPES) -> list[str]:
    lines = [
        "## Trained recipes (`bench/recipes.py`)",
        "",
        "Same data (Luma + all clothing photos), same held-out splits and the same budget (at "
        "most 60 minutes on this CPU, feature caching included) for every recipe; the "
        "`training` column says which parts of Lite0 each recipe trains (fine-tuned stages run "
        "on cached maps of the stage below) and for how many epochs. Held out: Luma products "
        "(`split_by: product`, leave-one-out by item) and clothing contributors (`split_by: "
        "sender_id`, category P@1 = R@1 leave-one-out). Training time includes feature caching "
        "unless an earlier recipe already cached the same features (the method recipes share "
        "one cache).",
        "",
        "| recipe | Luma R@1 | Luma R@10 | Luma mAP | clothing P@1 | clothing MAP@R "
        "| training | time |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
        row("ImageNet lite0", baseline_metrics(recipes[0]), None, "none"),
    ]
    for name in recipes:
        lines.append(row(name, *run_recipe(name, reuse)))
    if "vestis-lite0" in recipes:
        lines.append(row(f"vestis-lite0, shipped file (int8, {serving_settings()})",
                         baseline_metrics("vestis-lite0", model="vestis-lite0"), None,
                         "the row above, stored by scripts/ship_model.py"))
    notes = [video_note(), ""] if "video_triplet" in recipes else []
    return [*lines, "", *notes, f"Hardware: {hardware()}."]


def serving_settings() -> str:
    """The shipped default's input size, category weight and ImageNet weight, which the
    training row's validation (run before the recipe set them) did not use."""
    model = create_model("vestis-lite0")
    return (f"{model.preprocess.size} px, category weight {model.category_weight:g}, "
            f"ImageNet weight {model.imagenet_weight:g}")


def video_note() -> str:
    """How the video rows were made, with the clip and crop steps' wall times when their
    summaries (``clips.json``, ``crops.json``) are there."""
    note = ("Video rows: `video_triplet` pretrains the heads without labels on garment crops "
            "of **synthetic** clips (real Clothing Co-Parsing street photos under a moving "
            "virtual camera, `scripts/make_clips.py`; no real fashion video), anchor and "
            "positive from one tracked garment 25 frames apart, negatives from other clips "
            "(random, then the top-4 hardest); Luma and clothing are only scored. "
            "`video_finetune` is `triplet` started from it. Their time column is training "
            "alone")
    clips, crops = _summary(VIDEO_CLIPS / "clips.json"), _summary(VIDEO_CROPS / "crops.json")
    if clips and crops:
        note += (f"; making the {clips['clips']} clips took {clips['wall_s'] / 60:.1f} min and "
                 f"their {crops['crops']} crops of {crops['tracks']} tracks "
                 f"{crops['wall_s'] / 60:.1f} min")
    return note + (". The four steps ran while other jobs shared the two cores (load 4 to 6): "
                   "`video_finetune` does the same work as `triplet`, which took 3.3 min on a "
                   "quiet machine.")


def _summary(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="Keep finished runs in runs/bench.")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="Comma-separated recipe names (default: all of RECIPES).")
    args = parser.parse_args()
    recipes = tuple(name.strip() for name in args.recipes.split(",") if name.strip())
    unknown = [name for name in recipes if not (CONFIGS / f"{name}.yaml").exists()]
    if unknown or not recipes:
        parser.error(f"no recipe in configs/ for: {', '.join(unknown) or '(none given)'}")
    section = recipes_section(args.reuse, recipes)
    print("\n".join(section))
    if args.update:
        if set(recipes) != set(RECIPES) and args.update.exists():
            section = kept_rows(args.update.read_text().splitlines(), section)
            section.insert(-1, f"Re-run on {date.today()}: {', '.join(recipes)}; the other "
                               "rows are from earlier runs.")
            section.insert(-1, "")
        replace_section(args.update, section)


def kept_rows(report: list[str], section: list[str]) -> list[str]:
    """``section`` (some recipes re-run) with the report's rows of the other recipes kept,
    in the report's order: each re-run recipe's row replaces its old one."""
    if section[0] not in report:
        return section
    old_rows, old_rest = _split_table(report[report.index(section[0]) + 1:])
    head, body = section[:_table_start(section)], section[_table_start(section):]
    new = {_row_name(line): line for line in body if line.startswith("| ")}
    rows = [new.pop(_row_name(line), line) for line in old_rows]
    tail = [line for line in body if not line.startswith("| ")]
    old_notes = [line for line in old_rest
                 if line and line not in tail and not line.startswith(("Hardware", "Re-run on"))]
    notes = [note for line in old_notes for note in (line, "")]
    return [*head, *rows, *new.values(), *tail[:1], *notes, *tail[1:]]


def _table_start(lines: list[str]) -> int:
    """The index of the first table's first body row."""
    return next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1


def _split_table(lines: list[str]) -> tuple[list[str], list[str]]:
    """A section's lines (its title left out): the first table's body rows, and its lines
    after that table up to the next section."""
    first = _table_start(lines)
    end = next((i for i in range(first, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = [line for line in lines[first:end] if line.startswith("| ")]
    return rows, [line for line in lines[first:end] if not line.startswith("| ")]


def _row_name(line: str) -> str:
    return line.split("|")[1].strip()


def publish_section(lines: list[str], notes: list[str], update: Path | None) -> None:
    """Print a section with its note paragraphs, and replace it in ``update`` if given."""
    for note in notes:
        lines = [*lines, "", note]
    print("\n".join(lines))
    if update:
        replace_section(update, lines)


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

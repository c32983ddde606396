"""Choose a recipe's serving settings (input size, category weight) on other splits.

    python bench/serving_cv.py [--recipe configs/vestis-lite0.yaml] [--seeds 1,2,3]
        [--sizes 224,240,256,288] [--weights 0,0.25,0.5,0.75,1,1.5] [--data DIR]
        [--runs runs/serving-cv] [--reuse] [--json-out F] [--json-in F ...]
        [--note TEXT] [--update BENCHMARKS.md]

The recipe is trained once per split seed. Seed 0's split is the one BENCHMARKS.md reports,
so the choice is made on the others. Each run's held-out Luma products and clothing
contributors are embedded at every input size, and every category weight is scored on the
same features. Neither setting changes training: the category weight only mixes the
classifier's probabilities into the vector, and training views keep the backbone's own size.

``--data`` reads the sources from a copy of ``../shared/data`` with the same layout (for
example one shrunk to travel to a GPU machine). ``--json-out`` saves the scores and
``--json-in`` merges saved ones, so the seeds can train in parallel processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from recipes import replace_section  # bench/, the script's own folder

from vestis.evaluation import retrieval_metrics
from vestis.models import create_model
from vestis.train import load_config, train
from vestis.train.sources import build_sources
from vestis.train.trainer import plain_features, serving_preprocess

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Serving settings (`bench/serving_cv.py`)"
METRICS = ("clothing_R@1", "clothing_mAP", "luma_R@1", "luma_mAP")
DEFAULT_DATA = "../shared/data"


def seed_config(recipe: Path, seed: int, data: Path | None) -> dict:
    config = yaml.safe_load(recipe.read_text())
    config["seed"] = seed
    for source in config["data"]["sources"]:
        path = Path(source["path"])
        if data is not None:
            source["path"] = str(data / path.parent.name / path.name)
        elif not path.is_absolute():
            source["path"] = str((REPO / path).resolve())
    return config


def score_run(checkpoint: Path, config: dict, sizes: list[int], weights: list[float],
              device: str) -> list[dict]:
    """Scores of one run's held-out splits at every size and category weight."""
    model = create_model(checkpoint).to(device)
    _, validation = build_sources(load_config(config))
    rows = []
    for split in validation:
        labels = [sample.item_id for sample in split.samples]
        for size in sizes:
            preprocess = serving_preprocess(model.preprocess, size)
            features = plain_features(model, split.samples, 64, device, preprocess).to(device)
            for weight in weights:
                model.category_weight = weight
                with torch.inference_mode():
                    vectors = F.normalize(model.embed_features(features), dim=1).cpu().numpy()
                result = retrieval_metrics(vectors, labels, vectors, labels,
                                           query_gallery_index=np.arange(len(labels)), ks=(1,))
                rows.append({"seed": config["seed"], "size": size, "weight": weight,
                             f"{split.name}_R@1": float(result.metrics["R@1"]),
                             f"{split.name}_mAP": float(result.metrics["mAP"])})
    return merge_rows(rows)


def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per (seed, size, weight) with every split's metrics."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        merged.setdefault((row["seed"], row["size"], row["weight"]), {}).update(row)
    return list(merged.values())


def section(rows: list[dict], recipe: dict, notes: list[str]) -> list[str]:
    chosen = (recipe["model"].get("test_size"), recipe["model"].get("category_weight"))
    lines = [
        SECTION, "",
        f"The `{recipe['name']}` recipe trained on the splits of other seeds than 0 (other "
        "held-out Luma products and clothing contributors than the tables above), each run "
        "scored at every input size and category weight. Means over the seeds; the last column "
        "is clothing P@1 per seed. The recipe's setting is marked.", "",
    ]
    groups = sorted({(row.get("device", "CPU"), row.get("data", DEFAULT_DATA)) for row in rows})
    for device, data in groups:
        group = [row for row in rows
                 if (row.get("device", "CPU"), row.get("data", DEFAULT_DATA)) == (device, data)]
        seeds = ", ".join(str(seed) for seed in sorted({row["seed"] for row in group}))
        lines += [f"Seeds {seeds}; trained on {device}; data: {data}.", "", *table(group, chosen)]
    return [*lines, *(line for note in notes for line in (note, ""))]


def table(rows: list[dict], chosen: tuple) -> list[str]:
    lines = ["| size | category weight | clothing P@1 | clothing mAP | Luma R@1 | Luma mAP "
             "| clothing P@1 per seed |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for size, weight in sorted({(row["size"], row["weight"]) for row in rows}):
        group = sorted((row for row in rows if (row["size"], row["weight"]) == (size, weight)),
                       key=lambda row: row["seed"])
        means = [statistics.fmean(row[key] for row in group) for key in METRICS]
        per_seed = " ".join(f"{row['clothing_R@1']:.3f}" for row in group)
        mark = " **(recipe)**" if (size, weight) == chosen else ""
        lines.append(f"| {size} | {weight:g}{mark} | "
                     + " | ".join(f"{value:.4f}" for value in means) + f" | {per_seed} |")
    return [*lines, ""]


def parse_list(text: str, kind=float) -> list:
    return [kind(value) for value in text.split(",") if value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "vestis-lite0.yaml")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sizes", default="224,240,256,288")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1,1.5")
    parser.add_argument("--data", type=Path, help="a copy of ../shared/data, same layout")
    parser.add_argument("--data-label", help="how the report names --data")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "serving-cv")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--json-in", type=Path, nargs="*", default=[])
    parser.add_argument("--note", action="append", default=[],
                        help="a paragraph to print under the tables (repeatable)")
    parser.add_argument("--update", type=Path, help="write the section into this report")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [row for path in args.json_in for row in json.loads(path.read_text())]
    for seed in parse_list(args.seeds, int):
        config = seed_config(args.recipe, seed, args.data)
        out = args.runs / f"seed-{seed}"
        if not (args.reuse and (out / "last.pt").exists()):
            train(config, out, progress=False)
        scored = score_run(out / "last.pt", config, parse_list(args.sizes, int),
                           parse_list(args.weights), device)
        name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
        data = args.data_label or (str(args.data) if args.data else DEFAULT_DATA)
        rows += [{**row, "device": name, "data": data} for row in scored]
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    if not rows:
        sys.exit("no scores: give --seeds or --json-in")
    recipe = {**yaml.safe_load(args.recipe.read_text()), "name": args.recipe.stem}
    lines = section(rows, recipe, args.note)
    print("\n".join(lines))
    if args.update:
        replace_section(args.update, lines)


if __name__ == "__main__":
    main()

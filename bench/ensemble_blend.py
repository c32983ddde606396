"""The shipped recipe's vectors beside a second recipe's, with ImageNet's, over trained folds.

    python bench/ensemble_blend.py [--base runs/kfold/vestis-lite0]
                                   [--other runs/kfold/vestis-lite0-frozen]
                                   [--weights "0.7,0.3,0;0.5,0.2,0.3;..."] [--update BENCHMARKS.md]

A question before building a model: would one vector made of three parts, the backbone's
ImageNet features, the base recipe's trained vector and the other recipe's trained vector,
transfer better than the base's ImageNet blend while keeping the in-shop goals? For each fold
k, both recipes' ``fold-k/last.pt`` (trained on the same folds, so their held-out photos are
the same) are embedded once; each weight triple (a, b, c) then scores cosine similarity
``a`` x ImageNet's + ``b`` x the base's + ``c`` x the other's, on Bagisto, Solidus and the
fold's held-out Luma products and clothing contributors. A cell: mean ± standard deviation
over the folds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from vestis.evaluation import retrieval_metrics
from vestis.evaluation.run import embed_dataset
from vestis.models import Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_blend import PROBE, _shown, blended, embed_parts, spread_cell  # noqa: E402
from recipes import publish_section  # noqa: E402
from transfer_ablation import SET_COLUMNS, SETS, eval_sets, set_table_head  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TITLE = "## ImageNet and two trained vectors over trained runs (`bench/ensemble_blend.py`)"
DEFAULT_WEIGHTS = "0.7,0.3,0;0.3,0,0.7;0.5,0.2,0.3;0.4,0.2,0.4;0.4,0.3,0.3;0.3,0.2,0.5"


def fold_parts(base: Path, other: Path) -> tuple[dict, dict, dict, int]:
    """One fold: its sets, the base's blended vectors at PROBE, the other's vectors, and the
    width of the ImageNet part."""
    sets = eval_sets(base / "config.yaml")
    net = blended(str(base / "last.pt"), PROBE)
    encoder = Encoder.from_name(str(other / "last.pt"))
    others = {name: embed_dataset(encoder, dataset) for name, dataset in sets.items()}
    return sets, embed_parts(net, sets), others, net.imagenet.num_features


def combine(base: np.ndarray, other: np.ndarray, width: int, weights) -> np.ndarray:
    a, b, c = weights
    imagenet = base[:, :width] / PROBE ** 0.5
    trained = base[:, width:] / (1 - PROBE) ** 0.5
    return np.hstack([a ** 0.5 * imagenet, b ** 0.5 * trained, c ** 0.5 * other])


def scores(parts, triples) -> dict:
    """``{triple: {(set, metric): value}}`` of one fold."""
    sets, base, other, width = parts
    out = {}
    for triple in triples:
        out[triple] = {}
        for name, dataset in sets.items():
            queries = combine(base[name][0], other[name][0], width, triple)
            gallery = combine(base[name][1], other[name][1], width, triple)
            result = retrieval_metrics(queries, dataset.query_ids, gallery, dataset.gallery_ids,
                                       query_gallery_index=dataset.query_gallery_index)
            for metric in SETS[name]:
                out[triple][name, metric] = result.metrics[metric]
    return out


def section(base: Path, other: Path, folds: list[dict], triples) -> list[str]:
    lines = [
        TITLE, "",
        f"Cosine similarity a x ImageNet Lite0's + b x `{base.name}`'s trained vector + c x "
        f"`{other.name}`'s, from the runs in `{_shown(base)}` and `{_shown(other)}` "
        f"({len(folds)} folds, each pair trained on the same folds and scored on the same "
        "held-out photos and shops). (0.7, 0.3, 0) is the shipped default's blend. A cell: mean "
        "± standard deviation over the folds.",
        "",
        *set_table_head("a, b, c"),
    ]
    for triple in triples:
        cells = [spread_cell([fold[triple][key] for fold in folds]) for key in SET_COLUMNS]
        lines.append(f"| {', '.join(f'{w:g}' for w in triple)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "runs/kfold/vestis-lite0")
    parser.add_argument("--other", type=Path, default=REPO / "runs/kfold/vestis-lite0-frozen")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="Triples a,b,c separated by ';' (each summing to 1).")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    parser.add_argument("--note", action="append", default=[],
                        help="A paragraph to print under the section (repeatable).")
    args = parser.parse_args()
    triples = [tuple(float(w) for w in text.split(",")) for text in args.weights.split(";")]
    if any(len(t) != 3 or abs(sum(t) - 1) > 1e-6 or min(t) < 0 for t in triples):
        parser.error("--weights: triples of three non-negative weights summing to 1")
    runs = sorted(path.name for path in args.base.glob("fold-*") if path.is_dir())
    missing = [run for run in runs if not (args.other / run / "last.pt").is_file()]
    if not runs or missing:
        sys.exit(f"need the same finished folds in {args.base} and {args.other}")
    folds = [scores(fold_parts(args.base / run, args.other / run), triples) for run in runs]
    lines = section(args.base, args.other, folds, triples)
    publish_section(lines, args.note, args.update)


if __name__ == "__main__":
    main()

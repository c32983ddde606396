"""Other ImageNet descriptors in the default's blend, over its k-fold runs.

    python bench/imagenet_descriptors.py [--runs runs/kfold/vestis-lite0] [--update BENCHMARKS.md]

The default vector is ``0.7`` x ImageNet Lite0's average-pooled head map + ``0.3`` x the
trained vector (which carries the category probabilities at weight 0.5). Could a better
generic descriptor in the ImageNet block, or less of the category blend, lift the shops no
recipe trains on without costing the in-shop goals? For each fold of the shipped recipe's
k-fold runs, the fold's model is embedded once (its two blocks) and a probe network embeds
the same photos with several descriptors of the frozen ImageNet Lite0: the head map
average- and GeM-pooled, both also averaged with the horizontally flipped photo, and
GeM-pooled stage 4 and 5 maps (lower stages keep more colour and texture), ImageNet Lite2's
head map (a larger backbone) and Lite0's head map at other input sizes (192 and 352 px, for
multi-scale descriptors; the 352 px input is resized once and the 192 px one taken from it).
Each row swaps
the ImageNet block (or re-weights the category block) and scores Bagisto, Solidus and the
fold's held-out Luma products and clothing contributors, photos read as ``vestis eval``
reads them with no flag. Per-query values are pooled over the folds; each row's difference
to the shipped descriptor is paired, with a 95 % bootstrap interval.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vestis.evaluation import retrieval_metrics
from vestis.evaluation.run import embed_dataset
from vestis.models import Encoder
from vestis.models.efficientnet_lite import efficientnet_lite
from vestis.models.hooks import ModelHooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crops_kfold import add_values, difference_cell, fold_arguments, value_cell  # noqa: E402
from imagenet_blend import PROBE, blended, embed_parts  # noqa: E402
from recipes import publish_section  # noqa: E402
from transfer_ablation import SET_COLUMNS, _shown, eval_sets, set_table_head  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TITLE = "## ImageNet descriptors in the default's blend (`bench/imagenet_descriptors.py`)"
DESCRIPTORS = {"head avg": 1280, "head gem": 1280, "head avg+flip": 1280,
               "head gem+flip": 1280, "stage5 gem": 192, "stage4 gem": 112,
               "lite2 head avg": 1280}
#: Lite0's average-pooled head map at other input sizes: the first is the probe's input.
SCALES = {"head avg 352": 352, "head avg 192": 192}
#: Row name → (ImageNet block as (descriptor, weight) pairs, ImageNet share, category weight).
ROWS = {
    "shipped (head avg)": ((("head avg", 1.0),), 0.7, 0.5),
    "head gem": ((("head gem", 1.0),), 0.7, 0.5),
    "head avg + flip": ((("head avg+flip", 1.0),), 0.7, 0.5),
    "head gem + flip": ((("head gem+flip", 1.0),), 0.7, 0.5),
    "head avg + stage 5": ((("head avg", 1.0), ("stage5 gem", 0.3)), 0.7, 0.5),
    "head avg + stages 4, 5": ((("head avg", 1.0), ("stage5 gem", 0.3),
                                ("stage4 gem", 0.3)), 0.7, 0.5),
    "Lite2 head avg": ((("lite2 head avg", 1.0),), 0.7, 0.5),
    "Lite0 + Lite2 head avg": ((("head avg", 1.0), ("lite2 head avg", 1.0)), 0.7, 0.5),
    "head avg at 192, 256, 352 px": ((("head avg 192", 1.0), ("head avg", 1.0),
                                      ("head avg 352", 1.0)), 0.7, 0.5),
    "head avg at 256, 352 px": ((("head avg", 1.0), ("head avg 352", 1.0)), 0.7, 0.5),
    "category weight 0": ((("head avg", 1.0),), 0.7, 0.0),
    "category weight 0.25": ((("head avg", 1.0),), 0.7, 0.25),
    "ImageNet share 0.8": ((("head avg", 1.0),), 0.8, 0.5),
}
BASE_ROW = "shipped (head avg)"


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)


class DescriptorProbe(ModelHooks):
    """Frozen ImageNet Lite0 and Lite2; the vector joins the L2-normalised
    :data:`DESCRIPTORS`."""

    def __init__(self, preprocess):
        super().__init__()
        self.net = efficientnet_lite("lite0", pretrained=True).eval()
        self.lite2 = efficientnet_lite("lite2", pretrained=True).eval()
        self.preprocess = preprocess
        self.embed_dim = sum(DESCRIPTORS.values())
        self.onnx_exportable = False

    def pooled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.net.run_stages(x)
        head = self.net.head(stages[-1])
        return {"head avg": head.mean(dim=(2, 3)), "head gem": gem(head),
                "stage5 gem": gem(stages[5]), "stage4 gem": gem(stages[4])}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain, flipped = self.pooled(x), self.pooled(x.flip(3))
        plain["head avg+flip"] = plain["head avg"] + flipped["head avg"]
        plain["head gem+flip"] = plain["head gem"] + flipped["head gem"]
        plain["lite2 head avg"] = self.lite2.head(self.lite2.run_stages(x)[-1]).mean(dim=(2, 3))
        return torch.cat([F.normalize(plain[name], dim=1) for name in DESCRIPTORS], dim=1)


class ScaleProbe(ModelHooks):
    """Frozen ImageNet Lite0's average-pooled head map at each of :data:`SCALES`."""

    def __init__(self, preprocess):
        super().__init__()
        self.net = efficientnet_lite("lite0", pretrained=True).eval()
        self.preprocess = replace(preprocess, size=next(iter(SCALES.values())))
        self.embed_dim = 1280 * len(SCALES)
        self.onnx_exportable = False

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x if size == x.shape[-1] else F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            for size in SCALES.values()]
        return torch.cat([F.normalize(self.net.head(self.net.run_stages(view)[-1])
                                      .mean(dim=(2, 3)), dim=1) for view in views], dim=1)


def blocks(vectors: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """Each descriptor of the two probes' vectors, L2-normalised."""
    out, start = {}, 0
    for name, width in DESCRIPTORS.items():
        out[name] = _unit(vectors[:, start:start + width])
        start += width
    for n, name in enumerate(SCALES):
        out[name] = _unit(scales[:, 1280 * n:1280 * (n + 1)])
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def row_vectors(base: np.ndarray, parts: dict[str, np.ndarray], width: int, instance: int,
                spec) -> np.ndarray:
    """The default's vectors with the ImageNet block and weights of one :data:`ROWS` row
    (``base``: the fold model's vectors, ImageNet block first, ``width`` wide; the trained
    block's instance embedding ``instance`` wide, then its category probabilities;
    ``parts``: the probes' descriptors, :func:`blocks`)."""
    descriptors, share, category = spec
    imagenet = np.hstack([weight ** 0.5 * parts[name] for name, weight in descriptors])
    imagenet = _unit(imagenet)
    trained = _unit(base[:, width:])
    if category != 0.5:  # the trained block is [instance, 0.5 x category probabilities]
        embedding, probabilities = _unit(trained[:, :instance]), _unit(trained[:, instance:])
        trained = _unit(np.hstack([embedding, category * probabilities]))
    return np.hstack([share ** 0.5 * imagenet, (1 - share) ** 0.5 * trained])


def score_fold(run: Path, fold: int, pooled: dict) -> None:
    sets = eval_sets(run / "config.yaml")
    net = blended(str(run / "last.pt"), PROBE)
    base = embed_parts(net, sets)
    probes = [Encoder(probe(net.preprocess), backend="torch")
              for probe in (DescriptorProbe, ScaleProbe)]
    width = net.imagenet.num_features
    for name, dataset in sets.items():
        descriptors, scales = (embed_dataset(encoder, dataset) for encoder in probes)
        parts = [blocks(*pair) for pair in zip(descriptors, scales, strict=True)]
        for row, spec in ROWS.items():
            queries, gallery = (row_vectors(b, p, width, net.embed_dim, spec) for b, p in
                                zip(base[name], parts, strict=True))
            result = retrieval_metrics(queries, dataset.query_ids, gallery,
                                       dataset.gallery_ids,
                                       query_gallery_index=dataset.query_gallery_index)
            add_values(pooled, (row, name), result, dataset, fold)


def section(pooled: dict, runs: Path, folds: int) -> list[str]:
    lines = [
        TITLE, "",
        f"The {folds} fold models of `{_shown(runs)}` with the ImageNet block of "
        "their vector swapped for another descriptor of the frozen ImageNet Lite0, or their "
        "weights changed (ImageNet share, category weight); photos as `vestis eval` reads "
        "them with no flag. The first row is the default as shipped. A cell pools the "
        "per-query values of the folds: the metric and its 95 % bootstrap interval; below "
        "the first row, the paired difference to it, **bold** when its interval excludes 0.",
        "",
        *set_table_head("row"),
    ]
    for row in ROWS:
        cells = []
        for name, metric in SET_COLUMNS:
            entry, base = pooled[row, name], pooled[BASE_ROW, name]
            cells.append(value_cell(entry, metric) if row == BASE_ROW
                         else difference_cell(entry, base, metric))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    args, runs = fold_arguments(__doc__.splitlines()[0])
    pooled: dict = {}
    for fold, run in enumerate(runs):
        score_fold(run, fold, pooled)
        print(f"scored fold {fold}", file=sys.stderr)
    publish_section(section(pooled, args.runs, len(runs)), args.note, args.update)


if __name__ == "__main__":
    main()

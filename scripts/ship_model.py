"""Store a retrieval run as a shipped model, patching the serving settings of an old run.

    python scripts/ship_model.py runs/bench/vestis-lite0/last.pt [--name vestis-lite0]
        [--test-size 256] [--category-weight 0.5] [--imagenet-weight 0.7]

``vestis ship RUN NAME`` is the shipping step (src/vestis/train/ship.py: small int8 file,
recipe and metrics kept in the metadata); this script does the same for a run trained
before its recipe gained its serving settings: ``--test-size``, ``--category-weight`` and
``--imagenet-weight`` set them (none changes a training step; see ``model.test_size``,
``model.category_weight`` and ``model.imagenet_weight`` in configs/vestis-lite0.yaml). NAME
must be a retrieval artifact of src/vestis/artifacts.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vestis.artifacts import artifact_path
from vestis.train.ship import store_retrieval
from vestis.train.trainer import serving_preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", default="vestis-lite0")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights instead of int8")
    parser.add_argument("--test-size", type=int, help="embed at this input size")
    parser.add_argument("--category-weight", type=float,
                        help="weight of the category probabilities in the vector")
    parser.add_argument("--imagenet-weight", type=float,
                        help="weight of the backbone's own ImageNet features in the similarity")
    args = parser.parse_args()
    dest = artifact_path(args.name, "retrieval")
    def serving(model, meta: dict) -> dict:
        return set_serving(model, meta, args.test_size, args.category_weight,
                           args.imagenet_weight)

    out = store_retrieval(args.checkpoint, dest, fp16=args.fp16, serving=serving)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")


def set_serving(model, meta: dict, test_size: int | None, category_weight: float | None,
                imagenet_weight: float | None = None) -> dict:
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
    if imagenet_weight is not None:
        # the ImageNet branch shares the stages below the fine-tuned ones
        from_stage = recipe_model.get("finetune_from_stage") or 0
        model.blend_imagenet(imagenet_weight, from_stage)
        recipe_model.update(imagenet_weight=imagenet_weight, imagenet_from_stage=from_stage)
    meta = {**meta, "recipe": {**recipe, "model": recipe_model}} if recipe else dict(meta)
    changed = test_size or category_weight is not None or imagenet_weight is not None
    if changed and "metrics" in meta:
        # measured by the training run at its own settings, not these
        meta["training_metrics"] = meta.pop("metrics")
    return meta


if __name__ == "__main__":
    main()

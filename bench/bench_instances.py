"""Garments as instances against fragments: per-photo instance quality of the garment parser.

Usage::

    nice -n 5 python bench/bench_instances.py [--recipe configs/parser-lite0.yaml] [--luma N]

Two rule sets for turning the per-pixel labels into garments (:mod:`vestis.detect.boxes`):
``instances`` (the shipped rules: a group's fragments on one person are one garment) and
``fragments`` (the rules before: one garment per cluster of nearby connected regions, no
border-strip or footwear rule). For each, on the recipe's held-out Clothing Co-Parsing photos,
``vestis eval-parsing``'s figures (mIoU is the same for both by construction: only the
grouping of pixels into garments differs); and on Luma "main" product photos (no masks; the
parser never trained on Luma), garments per photo and extra instances of a group per photo
(beyond one, footwear beyond two).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vestis.detect import BoxRules, load_parser, regions_from_labels
from vestis.detect.train import load_recipe, recipe_split
from vestis.images import load_image

REPO = Path(__file__).resolve().parents[1]
LUMA = REPO.parent / "shared" / "data" / "luma" / "images"
RULES = {
    "instances": BoxRules(),
    "fragments": BoxRules(per_person=False, strip_area=0.0, max_footwear=1_000,
                          footwear_relative=0.0),
}


def luma_counts(parser, photos: list[Path]) -> dict[str, tuple[float, float]]:
    """Per rule set: (garments per photo, extra instances of a group per photo)."""
    totals = {name: [0, 0] for name in RULES}
    for path in photos:
        image = load_image(path)
        parsing = parser.segment(image, size=parser.input_size(image))
        for name, rules in RULES.items():
            regions = regions_from_labels(parsing.labels, parsing.probs, groups=parser.groups,
                                          rules=rules)
            groups = [r.group for r in regions]
            totals[name][0] += len(groups)
            totals[name][1] += sum(max(0, groups.count(g) - (2 if g == "footwear" else 1))
                                   for g in set(groups))
    return {name: (n / len(photos), extra / len(photos)) for name, (n, extra) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "parser-lite0.yaml")
    parser.add_argument("--parser", default="parser-lite0")
    parser.add_argument("--luma", type=int, default=None, help="Luma main photos (default all)")
    args = parser.parse_args()
    model = load_parser(args.parser)
    _, val, lookup = recipe_split(load_recipe(args.recipe))
    print(f"held-out CCP photos of {args.recipe.name}: {len(val)}")
    for name, rules in RULES.items():
        model.rules = rules
        metrics = model.evaluate_rows(val, lookup)
        m = metrics.instances
        print(f"{name:<10} mIoU {metrics.miou:.4f}  group precision {m.group_precision:.3f} "
              f"recall {m.group_recall:.3f}  fragments/photo {m.fragments:.3f}  garments per "
              f"full-body photo {m.garments_full_body:.2f} ({m.full_body_two_plus:.0%} >= 2, "
              f"{m.full_body_photos} photos)  box IoU {m.box_iou:.3f} ({m.box_iou_50:.0%} >= 0.5)")
    photos = sorted(LUMA.glob("*_main.jpg"))[: args.luma]
    model.rules = BoxRules()
    for name, (garments, extra) in luma_counts(model, photos).items():
        print(f"{name:<10} Luma main photos ({len(photos)}): {garments:.2f} garments, "
              f"{extra:.3f} extra same-group instances per photo")


if __name__ == "__main__":
    main()

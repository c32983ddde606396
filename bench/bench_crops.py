"""Garment crops against whole photos, for the default model, on held-out data.

    python bench/bench_crops.py [--model vestis-lite0] [--update BENCHMARKS.md]

The held-out splits are those of ``configs/vestis-lite0.yaml`` (the default model never saw
them): Luma products (instance retrieval, leave-one-out) and clothing contributors (category
retrieval, P@1 = R@1). Every image is parsed once by the shipped garment parser; then each
variant is embedded and scored:

* ``whole``: the whole photo;
* ``garment crop``: the bare crop of the garment the image's category names;
* ``garment in context``: the whole photo's vector plus that crop's, normalised (what
  ``vestis index --crop garment`` stores);
* ``largest in context``: the same with the largest garment found, categories ignored (what
  a query photo's garment gets);
* ``garment in context, masked grey``: with the crop's non-garment pixels painted grey.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vestis.detect import categories, load_parser
from vestis.detect.categories import category_group, product_box, product_parts
from vestis.images import load_image
from vestis.models import DEFAULT_MODEL, Encoder
from vestis.train import load_config
from vestis.train.sources import build_sources
from vestis.train.trainer import split_metrics

REPO = Path(__file__).resolve().parents[1]
TITLE = "## Garment crops (`bench/bench_crops.py`)"
VARIANTS = ("whole", "garment crop", "garment in context", "largest in context",
            "garment in context, masked grey")
GREY = (127, 127, 127)


def crops(image: Image.Image, garments, group: str | None) -> dict[str, Image.Image | None]:
    """The crop of every variant but ``whole`` for one photo (``None``: no trusted garment,
    the variant uses the whole photo)."""
    out: dict[str, Image.Image | None] = {}
    found = product_box(garments, group, image.size)
    largest = product_box(garments, None, image.size)
    out["garment crop"] = out["garment in context"] = image.crop(found[0]) if found else None
    out["largest in context"] = image.crop(largest[0]) if largest else None
    parts = product_parts(garments, group, image.size)
    if found and parts:
        mask = np.logical_or.reduce([g.mask for g in parts])
        painted = Image.composite(image, Image.new("RGB", image.size, GREY),
                                  Image.fromarray(mask.astype(np.uint8) * 255))
        out["garment in context, masked grey"] = painted.crop(found[0])
    else:
        out["garment in context, masked grey"] = None
    return out


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


#: The trust test of ``vestis.detect.categories`` as shipped (every parse whose product
#: covers 5 % of the photo), and a stricter one (confident, dominant products only).
POLICIES = {
    "every parse (shipped)": {},
    "confident, dominant parses only": {"MIN_PRODUCT_AREA": 0.1, "MIN_PRODUCT_SCORE": 0.85,
                                        "MIN_DOMINANCE": 0.6},
}


@contextlib.contextmanager
def trust_test(overrides: dict[str, float]):
    saved = {name: getattr(categories, name) for name in overrides}
    try:
        for name, value in overrides.items():
            setattr(categories, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(categories, name, value)


def variant_vectors(encoder: Encoder, image: Image.Image, views) -> dict[str, np.ndarray]:
    names = [name for name, view in views.items() if view is not None]
    embedded = encoder.embed([image] + [views[name] for name in names])
    whole, crop_vectors = embedded[0], dict(zip(names, embedded[1:], strict=True))
    out = {}
    for name in VARIANTS:
        crop = crop_vectors.get(name)
        if crop is None:
            out[name] = whole
        elif name == "garment crop":
            out[name] = crop
        else:
            out[name] = unit(whole + crop)
    return out


def score_split(split, parser, encoder: Encoder) -> tuple[dict, float, dict[str, float]]:
    """R@1 per policy and variant, the median parse time, and the share of photos with a
    garment per policy."""
    vectors = {policy: {name: [] for name in VARIANTS} for policy in POLICIES}
    parse_seconds, cropped = [], dict.fromkeys(POLICIES, 0)
    for sample in tqdm(split.samples, desc=split.name, unit="img"):
        image = load_image(sample.path)
        started = time.perf_counter()
        garments = parser.parse(image)
        parse_seconds.append(time.perf_counter() - started)
        group = category_group(sample.category or sample.item_id)
        for policy, overrides in POLICIES.items():
            with trust_test(overrides):
                views = crops(image, garments, group)
            cropped[policy] += views["garment crop"] is not None
            for name, vector in variant_vectors(encoder, image, views).items():
                vectors[policy][name].append(vector)
    scores = {policy: {name: split_metrics(np.stack(rows), split)[f"{split.name}_R@1"]
                       for name, rows in by_name.items()} for policy, by_name in vectors.items()}
    shares = {policy: count / len(split.samples) for policy, count in cropped.items()}
    return scores, float(np.median(parse_seconds)), shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "vestis-lite0.yaml")
    parser.add_argument("--update", type=Path, help="Replace this section in a BENCHMARKS.md.")
    args = parser.parse_args()
    _, validation = build_sources(load_config(args.recipe))
    garment_parser = load_parser()
    encoder = Encoder.from_name(args.model)
    results = {split.name: score_split(split, garment_parser, encoder) for split in validation}
    header = " | ".join(f"{name} R@1" for policy in POLICIES for name in results)
    policies = " | ".join(f"{policy}" for policy in POLICIES for _ in results)
    lines = [
        TITLE, "",
        f"Model `{args.model}`, parser `parser-lite0` ({garment_parser.backend_name}), on the "
        f"held-out splits of `{args.recipe.relative_to(REPO)}`: "
        + ", ".join(f"{name} {len(split.samples)} images" for name, split
                    in zip(results, validation, strict=True))
        + ". Luma R@1 is instance retrieval; clothing R@1 is category P@1. `garment` is the "
        "garment each image's category names, `largest` the largest garment found (as for a "
        "query photo, no category); a photo whose parse is not trusted (see "
        "`vestis.detect.categories`) stays whole in every variant. `crop` embeds the bare "
        "crop; `in context` (what `vestis index --crop garment` and garment queries use) the "
        "normalised sum of the whole photo's vector and the crop's; `masked grey` paints the "
        "crop's non-garment pixels grey. Share of photos with a garment used: "
        + "; ".join(f"{policy}: " + ", ".join(f"{name} {shares[policy]:.0%}" for name, (_, _,
                    shares) in results.items()) for policy in POLICIES) + ".",
        "",
        f"| policy | {policies} |",
        "|---|" + "---:|" * len(results) * len(POLICIES),
        f"| **variant** | {header} |",
    ]
    for name in VARIANTS:
        cells = " | ".join(f"{scores[policy][name]:.4f}" for policy in POLICIES
                           for scores, _, _ in results.values())
        lines.append(f"| {name} | {cells} |")
    parse_ms = max(seconds for _, seconds, _ in results.values()) * 1000
    lines += ["", f"Median parse time per photo in this run: {parse_ms:.0f} ms (shared CPU)."]
    print("\n".join(lines))
    if args.update:
        from recipes import replace_section

        replace_section(args.update, lines)


if __name__ == "__main__":
    main()

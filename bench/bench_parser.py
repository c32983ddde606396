"""Garment-parser latency per photo on this machine's CPU.

Usage::

    nice -n 5 python bench/bench_parser.py [--photos 40] [--parser parser-lite0] [--threads N]
        [--update BENCHMARKS.md]    # also the held-out mIoU, and both into the report

Times ``GarmentParser.parse(path)`` end to end: JPEG decode, resize, the network (on the
parser's backend, ONNX Runtime when installed; photo and mirror image as one batch),
upsampling to the network input's size, and garment instances from the label map. Photos are
the first ``--photos`` held-out Clothing Co-Parsing photos of ``configs/parser-lite0.yaml`` (street
photos, 512 px on the long side). Prints the median and spread, the time of each step, and
the load average before and after, and the process's CPU time per photo (the machine may be
shared: wall time grows with the load, CPU time much less).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from vestis.detect import GARMENT_GROUPS, load_parser, regions_from_labels
from vestis.detect.train import load_recipe, recipe_split
from vestis.images import load_image

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--parser", default="parser-lite0")
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "parser-lite0.yaml")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default all; the torch backend only)")
    parser.add_argument("--backend", default="auto", help="auto, onnx or torch")
    parser.add_argument("--no-flip", action="store_true", help="no mirror-image averaging")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--update", type=Path,
                        help="Also score the recipe's held-out photos (mIoU) and write both "
                        "into this BENCHMARKS.md.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = load_parser(args.parser, backend=args.backend, flip=not args.no_flip)
    _, val, lookup = recipe_split(load_recipe(args.recipe))
    photos = [row.image for row in val[: args.photos]]
    if len(photos) < args.photos:
        raise SystemExit(f"only {len(photos)} held-out photos")
    for path in photos[: args.warmup]:
        model.parse(path)
    totals, cpu, steps = [], [], {"decode": [], "network": [], "upsample+argmax": [], "boxes": []}
    for path in photos:
        start, start_cpu = time.perf_counter(), time.process_time()
        garments = model.parse(path)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        # The same work split into steps (a second pass), to see where the time goes.
        t0 = time.perf_counter()
        image = load_image(path)
        t1 = time.perf_counter()
        model.logits(image)
        t2 = time.perf_counter()
        parsing = model.segment(image)
        t3 = time.perf_counter()
        regions_from_labels(parsing.labels, parsing.probs, groups=model.groups)
        t4 = time.perf_counter()
        steps["decode"].append(t1 - t0)
        steps["network"].append(t2 - t1)
        steps["upsample+argmax"].append(max(0.0, (t3 - t2) - (t2 - t1)))
        steps["boxes"].append(t4 - t3)
        assert garments is not None
    load_after = os.getloadavg()
    ms = sorted(t * 1000 for t in totals)
    print(f"parser {args.parser} on {model.backend_name} (flip {model.flip}): {len(ms)} photos, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"per photo (decode included): median {statistics.median(ms):.1f} ms, "
          f"min {ms[0]:.1f}, p90 {ms[int(0.9 * (len(ms) - 1))]:.1f}, max {ms[-1]:.1f}")
    print(f"CPU time per photo (all threads, independent of other load): median "
          f"{statistics.median(cpu) * 1000:.1f} ms")
    for name, values in steps.items():
        print(f"  {name:<16} median {statistics.median(values) * 1000:6.1f} ms")
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{v:.2f}" for v in load_before)
          + "; after: " + ", ".join(f"{v:.2f}" for v in load_after))
    if args.update:
        metrics = model.evaluate_rows(val, lookup, progress=True)
        iou = ", ".join(f"{group} {metrics.iou[group]:.3f}" for group in GARMENT_GROUPS)
        section = [
            "## Garment parser (`bench/bench_parser.py`)", "",
            f"Parser `{args.parser}` on {model.backend_name} (mirror-image averaging "
            f"{'on' if model.flip else 'off'}), the {len(val)} held-out photos of "
            f"`{args.recipe.relative_to(REPO)}`, at each mask's full resolution: **garment "
            f"mIoU {metrics.miou:.3f}** ({iou}); person {metrics.iou['person']:.3f} and "
            f"background {metrics.iou['background']:.3f} apart; pixel accuracy "
            f"{metrics.pixel_accuracy:.3f}.", "",
            instance_line(metrics.instances), "",
            f"Latency per photo (decode and boxes included), median of {len(ms)}: "
            f"{statistics.median(ms):.1f} ms (p90 {ms[int(0.9 * (len(ms) - 1))]:.1f}); load "
            f"average before {load_before[0]:.2f}.",
        ]
        print("\n".join(section))
        from recipes import replace_section

        replace_section(args.update, section)


def instance_line(m) -> str:
    """The garments ``parse`` returns, as instances, on the held-out photos (README, "Garment
    parser"; ``bench/bench_instances.py`` compares them with the fragments rules)."""
    return (f"Garments as instances (`vestis eval-parsing`, per photo): group precision "
            f"{m.group_precision:.3f}, recall {m.group_recall:.3f}; **fragments {m.fragments:.3f}"
            f"** per photo (instances of a group beyond its true count); "
            f"**{m.garments_full_body:.2f} garments per full-body photo** "
            f"({m.full_body_two_plus:.0%} with 2 or more, {m.full_body_photos} photos); box IoU "
            f"of each group's largest instance with the true group box {m.box_iou:.3f} "
            f"({m.box_iou_50:.0%} at least 0.5, footwear aside).")


if __name__ == "__main__":
    main()

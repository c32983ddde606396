"""Video queries (Video2Shop) on synthetic clips of held-out Luma products.

Usage::

    nice -n 5 python bench/bench_video.py [--items N] [--seconds 6] [--crop none]
        [--long] [--minutes 10] [--update BENCHMARKS.md]

Retrieval: the held-out products of the default model's split
(:func:`vestis.data.products.product_split`; neither the model nor the learned fusion saw
them) are indexed as a catalog, and each held-out item is filmed in one synthetic clip
(:mod:`vestis.video.synth`: its photos in turn, pan, zoom or mixed by turns, occluders,
light drift). The clip is sampled and tracked once; the track of the item's garment group
(the longest of a compatible group, else the longest) is searched with each fusion. A clip
counts as a hit at K when its item is among that track's top K. ``first frame`` (the
track's first frame alone, like a photo query) is a reference. The clips are synthetic: a
still photo under a moving camera, so the figures say how the pieces behave, not how well
real videos are matched.

``--long``: first writes a long small clip (``--minutes``, 128 x 96) and streams it through
``sample_frames`` + tracking, reporting the peak resident memory (``getrusage``) before,
part-way and after: streaming should keep it flat.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vestis.catalog import Catalog
from vestis.data.products import write_catalog_rows
from vestis.detect.categories import compatible_groups
from vestis.evaluation import bootstrap_intervals
from vestis.video.fusion import load_fusion
from vestis.video.reader import probe, sample_frames
from vestis.video.search import search_tracks, split_items, track_for_group
from vestis.video.synth import MOTIONS, make_clip, make_long_clip
from vestis.video.track import GarmentTracker

REPO = Path(__file__).resolve().parents[1]
LUMA = REPO.parent / "shared" / "data" / "luma" / "catalog.csv"
TITLE = "## Video queries (`bench/bench_video.py`)"
FUSIONS = ("first frame", "max", "mean", "learned")
KS = (1, 5)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def held_out_catalog(work: Path, crop: str) -> Catalog:
    """A catalog of every image of the held-out products."""
    held_items = split_items(LUMA, "held-out")
    source = write_catalog_rows(LUMA, lambda row: row["item_id"] in held_items,
                                work / "held-out.csv")
    catalog = Catalog(work / "catalog", model="vestis-lite0")
    report = catalog.add(source, crop=crop, progress=True)
    if report.failed:
        raise SystemExit(f"indexing failed: {report.failed[:3]}")
    return catalog


def retrieval(args, work: Path) -> dict:
    items = split_items(LUMA, "held-out")
    names = list(items)[: args.items] if args.items else list(items)
    catalog = held_out_catalog(work, args.crop)
    fusions = {"first frame": lambda scores, quality=None: scores[0],
               **{name: load_fusion(name) for name in ("max", "mean", "learned")}}
    hits = {name: np.zeros((len(names), len(KS))) for name in fusions}  # per clip, per K
    frames, tracks_per_clip, seconds, group_found = [], [], [], 0
    for n, name in enumerate(names):
        photos, group = items[name]
        clip = make_clip([str(p) for p in photos], work / "clip.mp4", seconds=args.seconds,
                         size=tuple(args.size), motion=MOTIONS[n % 3], seed=n)
        started = time.perf_counter()
        tracker = GarmentTracker(catalog.parser, catalog.encoder)
        for frame in sample_frames(clip, every=args.every):
            tracker.update(frame)
        tracks = tracker.finish()
        track = track_for_group(tracks, group)
        seconds.append(time.perf_counter() - started)
        tracks_per_clip.append(len(tracks))
        if track is None:
            continue
        frames.append(len(track))
        group_found += int(group is not None and track.group in compatible_groups(group))
        for label, fusion in fusions.items():
            found = search_tracks(catalog, [track], max(KS), fusion=fusion)[0].matches
            ranked = [m.item_id for m in found]
            hits[label][n] = [name in ranked[:k] for k in KS]
        print(f"{n + 1}/{len(names)} {name}: {len(tracks)} tracks, item track {track.group} "
              f"x{len(track)}", file=sys.stderr)
    catalog.close()
    return {"clips": len(names), "items": len(items),
            "recall": {label: _with_intervals(hits[label]) for label in fusions},
            "frames": float(np.mean(frames)) if frames else 0.0,
            "tracks": float(np.mean(tracks_per_clip)), "group_found": group_found,
            "seconds": float(np.median(seconds))}


def _with_intervals(hits: np.ndarray) -> list[tuple[float, float, float]]:
    """Per K: the clips' hit rate and its 95 % bootstrap interval (clips resampled)."""
    intervals = bootstrap_intervals({str(k): hits[:, n] for n, k in enumerate(KS)})
    return [(float(hits[:, n].mean()), *intervals[str(k)]) for n, k in enumerate(KS)]


def long_check(args, work: Path) -> dict:
    """Peak RSS while a long clip streams through sampling and tracking."""
    items = split_items(LUMA, "held-out")
    photos = [str(p[0][0]) for p in list(items.values())[:20]]
    started = time.perf_counter()
    clip = make_long_clip(photos, work / "long.mp4", minutes=args.minutes)
    written = time.perf_counter() - started
    info = probe(clip)
    from vestis.detect import load_parser
    from vestis.models import Encoder

    tracker = GarmentTracker(load_parser(), Encoder.from_name("vestis-lite0"))
    warm = make_clip(photos[0], work / "warm.mp4", seconds=2, size=(128, 96))
    for frame in sample_frames(warm, every=args.every):
        tracker.update(frame)
    tracker.finish()
    before, marks, count = peak_rss_mb(), [], 0
    started = time.perf_counter()
    for frame in sample_frames(clip, every=args.every):
        tracker.update(frame)
        count += 1
        if count % 100 == 0:
            marks.append((round(frame.time_s / 60, 1), round(peak_rss_mb())))
    tracks = tracker.finish()
    return {"minutes": round((info.duration_s or 0) / 60, 1), "frames": info.frames,
            "size": f"{info.width}x{info.height}", "mb": round(clip.stat().st_size / 2**20, 1),
            "written_s": round(written, 1), "sampled": count, "tracks": len(tracks),
            "stream_s": round(time.perf_counter() - started, 1), "before_mb": round(before),
            "after_mb": round(peak_rss_mb()), "marks": marks}


def section(args, result: dict | None, long: dict | None) -> list[str]:
    lines = [TITLE, ""]
    if result:
        lines += [
            f"Synthetic clips (a still shop photo under a moving virtual camera, not real "
            f"video) of the {result['clips']} held-out Luma items of the default model's split, "
            f"{args.seconds:g} s, {args.size[0]}x{args.size[1]}, 25 fps, pan/zoom/mixed by "
            f"turns, occluders and light drift; every {args.every}th frame; the catalog is "
            f"every image of the held-out products (crop `{args.crop}`). The item's track (of "
            f"its garment group) has {result['frames']:.1f} frames on average; "
            f"{result['tracks']:.1f} tracks per clip; the item's group was tracked in "
            f"{result['group_found']} of {result['clips']} clips. Median sampling + tracking "
            f"time per clip: {result['seconds']:.1f} s (shared CPU). A cell is the hit rate "
            "and its 95 % bootstrap interval (clips resampled).", "",
            "| fusion | clip R@1 | clip R@5 |", "|---|---:|---:|"]
        for label, values in result["recall"].items():
            lines.append(f"| {label} | " + " | ".join(
                f"{mean:.3f} ({low:.2f}-{high:.2f})" for mean, low, high in values) + " |")
        lines.append("")
    if long:
        marks = ", ".join(f"{m} min {mb} MB" for m, mb in long["marks"][::2])
        lines += [
            f"Streaming: a {long['minutes']} min synthetic clip ({long['frames']} frames, "
            f"{long['size']}, {long['mb']} MB H.264) through `sample_frames` + tracking: "
            f"{long['sampled']} frames sampled, {long['tracks']} tracks, "
            f"{long['stream_s']:.0f} s. Peak RSS {long['before_mb']} MB with the models loaded "
            f"and warm, **{long['after_mb']} MB** after the whole clip (on the way: {marks}).",
            ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=0, help="first N held-out items (0: all)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240))
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--crop", default="none", help="catalog crop mode: none or garment")
    parser.add_argument("--long", action="store_true", help="also the long-clip memory check")
    parser.add_argument("--long-only", action="store_true", help="only the memory check")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--update", type=Path, help="write the section into this report")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        long = long_check(args, work) if args.long or args.long_only else None
        result = None if args.long_only else retrieval(args, work)
    lines = section(args, result, long)
    print("\n".join(lines))
    if args.update:
        sys.path.insert(0, str(Path(__file__).parent))
        from recipes import replace_section

        replace_section(args.update, lines)


if __name__ == "__main__":
    main()

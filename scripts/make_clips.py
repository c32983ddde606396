"""Make the unlabelled clip corpus of video-triplet pretraining (configs/video_triplet.yaml).

    python scripts/make_clips.py [--count 400] [--seconds 5] [--out runs/video-clips]

No real fashion video is available here, so these clips are **synthetic**: each is one real
street photo of Clothing Co-Parsing (``ccp/photos``, consumer domain, used by no evaluation
split) filmed by the virtual camera of :func:`vestis.video.synth.make_clip` (pans and zooms,
a hand-held wobble, drifting light, passing occluders). They have none of a real video's
body motion, pose change or motion blur: a track's crops differ by framing, light and
occlusion only. Luma photos are never used (held-out Luma products must stay unseen), nor
clothing photos (their contributors are split for evaluation).

Photos are drawn at random (``--seed``), one clip per photo; the same arguments give the
same clips. ``--out`` also gets ``clips.csv`` (clip, photo, motion, seed) and ``clips.json``
(the arguments and the wall time, which bench/recipes.py reports).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

from vestis.video.synth import make_clip

REPO = Path(__file__).resolve().parents[1]
CCP = REPO.parent / "shared" / "data" / "ccp"
MOTIONS = ("pan", "zoom")


def ccp_photos(root: Path = CCP) -> list[Path]:
    """Every photo listed in ``ccp/annotations.csv``, in the file's order."""
    with open(root / "annotations.csv", newline="", encoding="utf-8") as handle:
        return [root / row["image"] for row in csv.DictReader(handle)]


def choose(photos: list[Path], count: int, seed: int) -> list[Path]:
    """``count`` distinct photos drawn at random with ``seed`` (all when fewer)."""
    chosen = list(photos)
    random.Random(seed).shuffle(chosen)
    return chosen[:count]


def make_clips(photos: list[Path], out: Path, seconds: float, size: tuple[int, int],
               seed: int, fps: int = 25, progress: bool = True) -> list[dict[str, str]]:
    """One clip per photo, ``clip-NNNN.mp4`` under ``out``; pan and zoom by turns. Returns
    the manifest rows (also written to ``out/clips.csv``)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, photo in enumerate(tqdm(photos, desc="clips", unit="clip", disable=not progress)):
        name, motion, clip_seed = f"clip-{n:04d}.mp4", MOTIONS[n % len(MOTIONS)], seed * 100_003 + n
        make_clip(photo, out / name, seconds=seconds, fps=fps, size=size, motion=motion,
                  seed=clip_seed)
        rows.append({"clip": name, "photo": str(photo.relative_to(photo.parents[1])),
                     "motion": motion, "seed": str(clip_seed)})
    with open(out / "clips.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["clip", "photo", "motion", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="Clips (one photo each).")
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of each clip.")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ccp", type=Path, default=CCP, help="The ccp/ data folder.")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "video-clips")
    args = parser.parse_args()
    started = time.perf_counter()
    photos = choose(ccp_photos(args.ccp), args.count, args.seed)
    make_clips(photos, args.out, args.seconds, (args.width, args.height), args.seed)
    seconds = time.perf_counter() - started
    summary = {"clips": len(photos), "seconds_per_clip": args.seconds,
               "size": [args.width, args.height], "seed": args.seed, "source": "ccp/photos",
               "wall_s": round(seconds, 1)}
    (args.out / "clips.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(photos)} synthetic clips of {args.seconds:g} s in {args.out} "
          f"({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()

"""Garment crops from unlabelled videos: the training data of video-triplet pretraining.

"Watch fashion shows to tell clothing attributes" (2017; survey) pretrains a CNN on videos
without labels: garment crops of one clip, sampled 25 frames apart, are positives of each
other, crops of other clips are negatives (:mod:`vestis.losses.video_triplet`).
:func:`clip_crops` prepares that data: every video is sampled
(:func:`vestis.video.reader.sample_frames`, every 25th frame), its garments are tracked
(:func:`vestis.video.track.track_garments`), and each garment box of each track is saved as a
JPEG. One track (one garment followed through one clip) is one instance, ``item_id`` =
``<clip>:<track id>``. A track holds at most one box per sampled frame, so its crops are at
least ``every`` frames apart. Other garments of the same clip are other instances: when a batch
holds two tracks of one clip, each is a negative of the other (a different garment, though
not from another clip). Tracks with fewer than ``min_crops`` usable crops are skipped,
and so are whole-frame tracks (frames where the parser found no garment) unless asked for.

``out_dir/crops.csv`` has the columns ``image,item_id,clip,frame,time_s,group`` (images
relative to the CSV), ready for a ``kind: csv`` training source::

    - {name: video, kind: csv, path: runs/video-crops/crops.csv, extra_columns: [clip],
       split_by: clip, val_fraction: 0.05}

A video that cannot be read (:class:`~vestis.video.reader.VideoError`) is reported (a
:class:`SkippedVideoWarning`, and a line on stderr with ``progress``) and skipped.

    python -m vestis.video.crops runs/video-clips --out runs/video-crops

(which also writes ``crops.json``: the counts and the wall time).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from vestis.catalog.garments import WHOLE_IMAGE
from vestis.defaults import LINK_MODEL
from vestis.images import crop_box
from vestis.video.reader import DEFAULT_EVERY, VideoError, VideoFrame, sample_frames
from vestis.video.track import Track, track_garments

CROPS_CSV = "crops.csv"
COLUMNS = ("image", "item_id", "clip", "frame", "time_s", "group")
#: Tracks with fewer usable crops are skipped (a triplet needs an anchor and a positive).
MIN_CROPS = 2
#: Crops whose box is narrower or shorter than this (pixels) are not saved.
MIN_SIDE = 24
#: Frames are downscaled to this long side before parsing (as video search does).
MAX_SIDE = 1024
JPEG_QUALITY = 90
#: Files of a folder given to :func:`expand_videos` that are taken for videos.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg")


class SkippedVideoWarning(UserWarning):
    """A video could not be read at all and gave no crops."""


@dataclass(frozen=True)
class CropRow:
    """One row of ``crops.csv``."""

    image: str
    item_id: str
    clip: str
    frame: int
    time_s: float
    group: str


def clip_crops(videos: Iterable[str | Path], out_dir: str | Path, every: int = DEFAULT_EVERY,
               parser=None, encoder=None, progress: bool = True, *,
               min_crops: int = MIN_CROPS, keep_whole_frames: bool = False) -> Path:
    """Garment crops of every video in ``videos`` under ``out_dir`` (one folder per clip) and
    ``out_dir/crops.csv``; returns the CSV's path. ``parser``: a
    :class:`vestis.detect.GarmentParser` (default: the shipped one); ``encoder``: the
    :class:`vestis.models.Encoder` whose vectors link a garment across frames (default:
    plain ImageNet ``lite0``, so that no labelled training leaks into the pretraining data).
    See the module's docstring for the rules."""
    parser, encoder = _defaults(parser, encoder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = [Path(video) for video in videos]
    rows: list[CropRow] = []
    names = _clip_names(videos)
    for video, clip in tqdm(list(zip(videos, names, strict=True)), desc="videos", unit="video",
                            disable=not progress):
        try:
            rows += video_crops(video, out_dir, clip, every, parser, encoder,
                                min_crops=min_crops, keep_whole_frames=keep_whole_frames)
        except VideoError as exc:
            _report_skipped(exc, progress)
    return write_crops_csv(rows, out_dir / CROPS_CSV)


def _defaults(parser, encoder):
    if parser is None:
        from vestis.detect import load_parser

        parser = load_parser()
    if encoder is None:
        from vestis.models import Encoder

        encoder = Encoder.from_name(LINK_MODEL)
    return parser, encoder


def _clip_names(videos: Sequence[Path]) -> list[str]:
    """Each video's stem, made unique (``stem-2``, ...) when two videos share one."""
    names, seen = [], set()
    for video in videos:
        name, n = video.stem, 1
        while name in seen:
            n += 1
            name = f"{video.stem}-{n}"
        seen.add(name)
        names.append(name)
    return names


def _report_skipped(exc: VideoError, progress: bool) -> None:
    message = f"skipped {exc.source}: {exc.reason}"
    if progress:
        tqdm.write(message, file=sys.stderr)
    warnings.warn(message, SkippedVideoWarning, stacklevel=3)


def video_crops(video: str | Path, out_dir: Path, clip: str, every: int, parser, encoder, *,
                min_crops: int = MIN_CROPS, keep_whole_frames: bool = False) -> list[CropRow]:
    """The crops of one video, saved under ``out_dir/<clip>/``; raises
    :class:`~vestis.video.reader.VideoError` when the video cannot be read."""
    frames = list(sample_frames(video, every=every, max_side=MAX_SIDE))
    by_index = {frame.index: frame for frame in frames}
    rows: list[CropRow] = []
    for track in track_garments(frames, parser, encoder):
        if track.group == WHOLE_IMAGE and not keep_whole_frames:
            continue
        rows += track_crops(track, by_index, out_dir, clip, min_crops)
    return rows


def track_crops(track: Track, frames: dict[int, VideoFrame], out_dir: Path, clip: str,
                min_crops: int = MIN_CROPS) -> list[CropRow]:
    """One JPEG per usable box of ``track`` (none when fewer than ``min_crops``)."""
    crops = [(o, crop_box(frames[o.frame_index].image, o.box)) for o in track.observations
             if _usable(o.box)]
    if len(crops) < min_crops:
        return []
    folder = out_dir / clip
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for observation, crop in crops:
        name = f"t{track.track_id:02d}_f{observation.frame_index:06d}.jpg"
        _save(crop, folder / name)
        rows.append(CropRow(f"{clip}/{name}", f"{clip}:{track.track_id}", clip,
                            observation.frame_index, round(observation.time_s, 3), track.group))
    return rows


def _usable(box) -> bool:
    return box[2] - box[0] >= MIN_SIDE and box[3] - box[1] >= MIN_SIDE


def _save(image: Image.Image, path: Path) -> None:
    image.convert("RGB").save(path, format="JPEG", quality=JPEG_QUALITY)


def write_crops_csv(rows: Sequence[CropRow], path: Path) -> Path:
    """``crops.csv`` with :data:`COLUMNS`, one row per crop."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(astuple(row) for row in rows)
    return path


def read_crops_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``crops.csv`` as dicts."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vestis.video.crops VIDEOS... --out DIR [--every 25]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="+", type=Path, help="Video files (or folders of them).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for crops and crops.csv.")
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY,
                        help="Keep every Nth decoded frame (default 25).")
    parser.add_argument("--parser", default=None, help="Garment parser name or checkpoint.")
    parser.add_argument("--model", default=LINK_MODEL, help="Encoder that links garments.")
    args = parser.parse_args(argv)
    summary = make_crops(args.videos, args.out, args.every, args.parser, args.model)
    print(f"{summary['crops']} crops of {summary['tracks']} tracks from {summary['clips']} "
          f"clips in {summary['wall_s'] / 60:.1f} min: {args.out / CROPS_CSV}")


def make_crops(videos: Iterable[str | Path], out: str | Path, every: int = DEFAULT_EVERY,
               parser: str | None = None, model: str = LINK_MODEL, progress: bool = True
               ) -> dict[str, float]:
    """What the command line does: :func:`clip_crops` of ``videos`` (files or folders, see
    :func:`expand_videos`) with a parser and an encoder given by name, then
    ``out/crops.json`` (:func:`crops_summary`), which is also returned."""
    from vestis.detect import load_parser
    from vestis.models import Encoder

    started = time.perf_counter()
    garment_parser = load_parser(parser) if parser else load_parser()
    path = clip_crops(expand_videos(Path(v) for v in videos), out, every, garment_parser,
                      Encoder.from_name(model), progress)
    summary = crops_summary(path, time.perf_counter() - started)
    (Path(out) / "crops.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def crops_summary(path: Path, seconds: float) -> dict[str, float]:
    """Counts of a ``crops.csv`` (crops, tracks, clips) and the wall time that made it."""
    rows = read_crops_csv(path)
    return {"crops": len(rows), "tracks": len({row["item_id"] for row in rows}),
            "clips": len({row["clip"] for row in rows}), "wall_s": round(seconds, 1)}


def expand_videos(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a folder replaced by its video files (:data:`VIDEO_SUFFIXES`), sorted,
    without recursion."""
    videos: list[Path] = []
    for path in paths:
        if path.is_dir():
            videos += sorted(p for p in path.iterdir()
                             if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            videos.append(path)
    return videos


if __name__ == "__main__":
    main()

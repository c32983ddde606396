"""Video queries (Video2Shop): the catalog items that match each garment tracked in a video.

:func:`search_video` samples the video (:mod:`vestis.video.reader`), tracks its garments
(:mod:`vestis.video.track`), and for each track:

1. searches the catalog with every frame's vector (top ``candidates`` items each, among
   compatible garment groups as :func:`vestis.catalog.garments.search_garments` does);
2. scores every frame against every candidate in the union: one more search per frame,
   restricted to those items (``where={"item_id": [...]}``), which gives each item's best
   image score per frame without reading the store directly;
3. fuses the T x M similarities into one score per item (:mod:`vestis.video.fusion`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vestis.catalog.garments import GARMENT_KEY, WHOLE_IMAGE
from vestis.detect.categories import compatible_groups
from vestis.images import Box
from vestis.video.fusion import Fusion, TrackExample, frame_quality, load_fusion
from vestis.video.reader import DEFAULT_DEDUP, DEFAULT_EVERY, DEFAULT_SKIP, sample_frames
from vestis.video.track import Track, track_garments

if TYPE_CHECKING:
    from vestis.catalog.catalog import Catalog, Match

#: Candidates per frame are at least this many times ``k``.
CANDIDATE_FACTOR = 5
#: Frames are downscaled to this long side before parsing and embedding.
MAX_SIDE = 1024


@dataclass(frozen=True, eq=False)
class TrackHits:
    """One garment tracked through a video and the catalog items that match it.

    ``frames``/``times``: the sampled frames (decode index, seconds) it was seen in;
    ``best_frame_index``/``box``: its best view; ``thumbnail``: that view's crop. Each
    match's ``score`` is the fused score."""

    track_id: int
    group: str
    frames: list[int]
    best_frame_index: int
    thumbnail: Image.Image | None
    matches: list[Match]
    times: list[float]
    box: Box

    def to_dict(self, thumbnail: bool = False) -> dict[str, Any]:
        """JSON-ready; ``thumbnail`` adds the crop as a ``data:image/jpeg;base64`` URL."""
        out = {"track_id": self.track_id, "group": self.group, "frames": self.frames,
               "times": [round(t, 3) for t in self.times],
               "best_frame_index": self.best_frame_index, "box": list(self.box),
               "results": [m.to_dict() for m in self.matches]}
        if thumbnail and self.thumbnail is not None:
            buffer = io.BytesIO()
            self.thumbnail.convert("RGB").save(buffer, format="JPEG", quality=85)
            out["thumbnail"] = ("data:image/jpeg;base64,"
                                + base64.b64encode(buffer.getvalue()).decode("ascii"))
        return out


def search_video(catalog: Catalog, path: str | Path, k: int = 10, *,
                 fusion: str | Fusion = "learned", every: int = DEFAULT_EVERY,
                 progress: bool = False, where: dict[str, Any] | None = None,
                 compatible: bool = True, candidates: int | None = None,
                 skip_seconds: float = DEFAULT_SKIP, dedup: float | None = DEFAULT_DEDUP,
                 max_side: int | None = MAX_SIDE) -> list[TrackHits]:
    """Top-``k`` catalog items for each garment track of a video, longest track first.

    ``fusion``: ``learned``, ``max``, ``mean`` (see :mod:`vestis.video.fusion`), a
    checkpoint path or a function. ``every``, ``skip_seconds``, ``dedup``, ``max_side``:
    frame sampling (:func:`vestis.video.reader.sample_frames`). ``where``, ``compatible``:
    as for photo garments (:func:`vestis.catalog.garments.search_garments`).
    ``candidates``: items per frame pooled for fusion (default ``5 k``).
    Raises :class:`vestis.video.reader.VideoError` for an unreadable video.
    """
    fuse = load_fusion(fusion) if isinstance(fusion, (str, Path)) else fusion
    frames = sample_frames(path, every=every, skip_seconds=skip_seconds, dedup=dedup,
                           max_side=max_side, progress=progress)
    tracks = track_garments(frames, catalog.parser, catalog.encoder)
    return search_tracks(catalog, tracks, k, fusion=fuse, where=where, compatible=compatible,
                         candidates=candidates)


def search_tracks(catalog: Catalog, tracks: Sequence[Track], k: int = 10, *,
                  fusion: str | Fusion = "learned", where: dict[str, Any] | None = None,
                  compatible: bool = True, candidates: int | None = None) -> list[TrackHits]:
    """:func:`search_video` for tracks already made (to compare fusions on one tracking)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    fuse = load_fusion(fusion) if isinstance(fusion, (str, Path)) else fusion
    per_frame = max(candidates or 0, k * CANDIDATE_FACTOR)
    hits = []
    for track in tracks:
        condition = track_condition(catalog, track.group, where, compatible)
        items, scores, best = candidate_scores(catalog, track.vectors, per_frame, condition)
        fused = fuse(scores, frame_quality(scores, track.scores)) if items else np.zeros(0)
        order = np.argsort(-fused, kind="stable")[:k]
        matches = [replace(best[items[m]], score=float(fused[m])) for m in order]
        view = track.best_observation
        hits.append(TrackHits(track.track_id, track.group, track.frames, view.frame_index,
                              track.thumbnail, matches, track.times, view.box))
    return hits


def track_condition(catalog: Catalog, group: str, where: dict[str, Any] | None,
                    compatible: bool) -> dict[str, Any] | None:
    """The ``where`` of a track's searches: the caller's, plus compatible garment groups
    when the catalog has them (not for whole-frame tracks)."""
    condition = dict(where or {})
    if (compatible and catalog.has_garment_groups and GARMENT_KEY not in condition
            and group != WHOLE_IMAGE):
        condition[GARMENT_KEY] = list(compatible_groups(group))
    return condition or None


def candidate_scores(catalog: Catalog, vectors: np.ndarray, per_frame: int,
                     condition: dict[str, Any] | None
                     ) -> tuple[list[str], np.ndarray, dict[str, Match]]:
    """(candidate items, (T, M) best-image score of each item in each frame, each item's
    best match over the frames). Candidates: the union of each frame's top ``per_frame``."""
    items: dict[str, int] = {}
    for matches in catalog.search_vectors(vectors, per_frame, where=condition):
        for match in matches:
            items.setdefault(match.item_id, len(items))
    if not items:
        return [], np.zeros((len(vectors), 0), dtype=np.float32), {}
    only = dict(condition or {})
    only["item_id"] = _within(only.get("item_id"), list(items))
    scores = np.full((len(vectors), len(items)), np.nan, dtype=np.float32)
    best: dict[str, Match] = {}
    for t, matches in enumerate(catalog.search_vectors(vectors, len(items), where=only)):
        for match in matches:
            scores[t, items[match.item_id]] = match.score
            if match.item_id not in best or match.score > best[match.item_id].score:
                best[match.item_id] = match
    # An approximate index may miss an item in a frame: score it as that frame's worst.
    row_min = np.nanmin(np.where(np.isnan(scores), np.inf, scores), axis=1, keepdims=True)
    scores = np.where(np.isnan(scores), row_min, scores)
    return list(items), scores, best


def _within(given: Any, items: list[str]) -> list[str]:
    if given is None:
        return items
    allowed = {str(v) for v in (given if isinstance(given, (list, tuple, set)) else [given])}
    return [item for item in items if item in allowed]


def track_for_group(tracks: Sequence[Track], group: str | None) -> Track | None:
    """The track most likely to show a product of ``group``: the longest track of a
    compatible group, else the longest track (``None`` without tracks)."""
    if not tracks:
        return None
    fitting = [t for t in tracks if group is not None and t.group in compatible_groups(group)]
    return max(fitting or tracks, key=lambda t: (len(t), float(t.scores.mean())))


# -- synthetic training and benchmark tracks ------------------------------------------------
def clip_examples(catalog_csv: str | Path, work: Path, *, split: str = "train",
                  max_items: int | None = None, clips_per_item: int = 1, seconds: float = 6.0,
                  size: tuple[int, int] = (320, 240), every: int = DEFAULT_EVERY,
                  negatives: int = 20, seed: int = 0, model: str = "vestis-lite0",
                  progress: bool = True) -> list[TrackExample]:
    """Training tracks for the learned fusion: one synthetic clip per item of ``split``
    (``train`` or ``held-out`` products of :func:`vestis.data.products.product_split`),
    its item's track scored against every item of the split of compatible groups (each
    item's best image per frame, as a Flat catalog search would)."""
    from tqdm.auto import tqdm

    from vestis.detect import load_parser
    from vestis.models import Encoder
    from vestis.video.synth import MOTIONS, make_clip

    items = split_items(catalog_csv, split)
    encoder, parser = Encoder.from_name(model), load_parser()
    names = list(items)
    vectors = [encoder.embed([str(p) for p in items[name][0]]) for name in names]
    groups = [items[name][1] for name in names]
    chosen = names[:max_items] if max_items else names
    examples = []
    for n, name in enumerate(tqdm(chosen, desc="clips", unit="item", disable=not progress)):
        for c in range(clips_per_item):
            clip = make_clip([str(p) for p in items[name][0]], work / "clip.mp4",
                             seconds=seconds, size=size, motion=MOTIONS[(n + c) % 3],
                             seed=seed + 1000 * c + n)
            tracks = track_garments(sample_frames(clip, every=every), parser, encoder)
            track = track_for_group(tracks, items[name][1])
            example = _example(track, names.index(name), vectors, groups, negatives)
            if example is not None:
                examples.append(example)
    return examples


def _example(track: Track | None, positive: int, vectors: list[np.ndarray],
             groups: list[str | None], negatives: int) -> TrackExample | None:
    if track is None:
        return None
    allowed = (range(len(groups)) if track.group == WHOLE_IMAGE else
               [m for m, g in enumerate(groups) if g in compatible_groups(track.group)])
    allowed = list(allowed)
    if positive not in allowed:
        return None
    frames = track.vectors
    scores = np.stack([(frames @ vectors[m].T).max(axis=1) for m in allowed], axis=1)
    return TrackExample.from_scores(scores, allowed.index(positive), track.scores, negatives)


def split_items(catalog_csv: str | Path, split: str = "held-out"
                ) -> dict[str, tuple[list[Path], str | None]]:
    """{item: (photos, garment group of its category)} of the ``train`` or ``held-out``
    products of a Luma-layout CSV (the default model's split); front views first."""
    from vestis.data.products import product_split
    from vestis.detect.categories import category_group

    if split not in ("train", "held-out"):
        raise ValueError(f"split must be train or held-out, got {split!r}")
    train, held = product_split(catalog_csv)
    items: dict[str, tuple[list[Path], str | None]] = {}
    chosen = train if split == "train" else held
    for sample in sorted(chosen, key=lambda s: ("_main" not in s.path.name, str(s.path))):
        photos, _ = items.setdefault(sample.item_id, ([], category_group(sample.category)))
        photos.append(Path(sample.path))
    return dict(sorted(items.items()))

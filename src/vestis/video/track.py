"""Garment tracks: the same garment linked across a video's sampled frames.

Each sampled frame is parsed (:mod:`vestis.detect`) and each garment embedded in its
frame's context, exactly as a query photo's garments are
(:func:`vestis.views.query_views` and :func:`~vestis.views.garment_vectors`); a frame where
the parser finds nothing is one whole-image observation (group
:data:`~vestis.views.WHOLE_IMAGE`). Observations are linked to the open tracks
of the same group by an optimal assignment (Hungarian) on an affinity that mixes box overlap
(IoU with the track's last box) and appearance (cosine with the track's running mean
vector). Sampled frames are a second or so apart, so appearance carries most of the weight:
a pan moves a garment a long way between samples. No motion model.

A track not seen for more than ``max_gap`` sampled frames is closed. Tracks seen in fewer
than ``min_frames`` frames (a flicker of the parser) are dropped, unless that would drop
every track.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from vestis.images import Box
from vestis.video.reader import VideoFrame
from vestis.views import garment_vectors, query_views

#: Weight of box overlap in the affinity; the rest is cosine similarity of appearance.
IOU_WEIGHT = 0.3
#: An observation joins a track only at this affinity or more.
MIN_AFFINITY = 0.55
#: Sampled frames a track may go unseen before it is closed.
MAX_GAP = 2
#: Tracks seen in fewer frames are dropped (unless none would be left).
MIN_FRAMES = 2
#: Long side of a track's thumbnail (the garment in its best frame).
THUMB_SIDE = 256
#: Weight of the newest vector in a track's running appearance.
APPEARANCE_MOMENTUM = 0.5


@dataclass(frozen=True, eq=False)
class Observation:
    """A garment in one sampled frame: the frame's decode index and time, the garment's
    box in the frame, its in-context vector and the parser's score (1 for a whole frame)."""

    frame_index: int
    time_s: float
    box: Box
    vector: np.ndarray
    score: float
    #: The box's share of the frame (a proxy of how much of the garment is seen).
    area: float = 1.0

    @property
    def quality(self) -> float:
        """How good a view this is: confident and large (picks a track's best frame)."""
        return self.score * float(np.sqrt(self.area))


@dataclass(eq=False)
class Track:
    """One garment through a video: its group, per-frame observations and best frame."""

    track_id: int
    group: str
    observations: list[Observation] = field(default_factory=list)
    best: int = 0
    thumbnail: Image.Image | None = None
    appearance: np.ndarray | None = field(default=None, repr=False)
    misses: int = 0

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def frames(self) -> list[int]:
        return [o.frame_index for o in self.observations]

    @property
    def times(self) -> list[float]:
        return [o.time_s for o in self.observations]

    @property
    def vectors(self) -> np.ndarray:
        """(frames, dim) in-context vectors, in time order."""
        return np.stack([o.vector for o in self.observations])

    @property
    def scores(self) -> np.ndarray:
        return np.array([o.score for o in self.observations], dtype=np.float32)

    @property
    def best_observation(self) -> Observation:
        return self.observations[self.best]

    @property
    def last_box(self) -> Box:
        return self.observations[-1].box

    def add(self, observation: Observation, image: Image.Image) -> None:
        """Append an observation; keep a thumbnail when it is the best view so far."""
        self.observations.append(observation)
        self.misses = 0
        if self.appearance is None:
            self.appearance = observation.vector
        else:
            mixed = ((1 - APPEARANCE_MOMENTUM) * self.appearance
                     + APPEARANCE_MOMENTUM * observation.vector)
            self.appearance = mixed / max(float(np.linalg.norm(mixed)), 1e-12)
        if len(self.observations) == 1 or observation.quality > self.best_observation.quality:
            self.best = len(self.observations) - 1
            self.thumbnail = _thumbnail(image, observation.box)


def _thumbnail(image: Image.Image, box: Box) -> Image.Image:
    crop = image.crop(box)
    crop.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    return crop


def box_iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def observe(frame: VideoFrame, parser, encoder, fill: tuple[int, int, int] | None = None
            ) -> list[tuple[str, Observation]]:
    """(group, observation) for each garment of a frame, or one whole-frame observation."""
    image = frame.image
    views = query_views(image, parser, fill=fill)
    vectors = garment_vectors(encoder, image, views)
    size = float(image.width * image.height)
    return [(group, Observation(frame.index, frame.time_s, tuple(int(v) for v in box), vector,
                                float(score), (box[2] - box[0]) * (box[3] - box[1]) / size))
            for (group, box, score, _), vector in zip(views, vectors, strict=True)]


def affinity(track: Track, observation: Observation, iou_weight: float = IOU_WEIGHT) -> float:
    """How well an observation continues a track: IoU and cosine, mixed."""
    cosine = float(track.appearance @ observation.vector)
    return iou_weight * box_iou(track.last_box, observation.box) + (1 - iou_weight) * cosine


def link(tracks: list[Track], found: list[tuple[str, Observation]], iou_weight: float,
         min_affinity: float) -> tuple[list[tuple[int, int]], list[int]]:
    """Optimal (track, observation) pairs of one group each, at ``min_affinity`` or more,
    and the observations left over."""
    if not tracks or not found:
        return [], list(range(len(found)))
    scores = np.full((len(tracks), len(found)), -1.0)
    for i, track in enumerate(tracks):
        for j, (group, observation) in enumerate(found):
            if group == track.group:
                scores[i, j] = affinity(track, observation, iou_weight)
    rows, cols = linear_sum_assignment(-scores)
    pairs = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)
             if scores[i, j] >= min_affinity]
    used = {j for _, j in pairs}
    return pairs, [j for j in range(len(found)) if j not in used]


class GarmentTracker:
    """Online tracker: :meth:`update` with each sampled frame, then :meth:`finish`."""

    def __init__(self, parser, encoder, *, iou_weight: float = IOU_WEIGHT,
                 min_affinity: float = MIN_AFFINITY, max_gap: int = MAX_GAP,
                 min_frames: int = MIN_FRAMES, fill: tuple[int, int, int] | None = None):
        self.parser, self.encoder, self.fill = parser, encoder, fill
        self.iou_weight, self.min_affinity = iou_weight, min_affinity
        self.max_gap, self.min_frames = max_gap, min_frames
        self.active: list[Track] = []
        self.closed: list[Track] = []
        self.frames_seen = 0
        self._next_id = 0

    def update(self, frame: VideoFrame) -> None:
        found = observe(frame, self.parser, self.encoder, self.fill)
        pairs, fresh = link(self.active, found, self.iou_weight, self.min_affinity)
        matched = set()
        for i, j in pairs:
            self.active[i].add(found[j][1], frame.image)
            matched.add(i)
        for i, track in enumerate(self.active):
            if i not in matched:
                track.misses += 1
        for j in fresh:
            track = Track(self._next_id, found[j][0])
            track.add(found[j][1], frame.image)
            self.active.append(track)
            self._next_id += 1
        self.closed += [t for t in self.active if t.misses > self.max_gap]
        self.active = [t for t in self.active if t.misses <= self.max_gap]
        self.frames_seen += 1

    def finish(self) -> list[Track]:
        """All tracks, short ones dropped (see the module), longest first; ids renumbered
        in order of first appearance."""
        tracks = self.closed + self.active
        self.closed, self.active = [], []
        need = min(self.min_frames, self.frames_seen)
        kept = [t for t in tracks if len(t) >= need] or tracks
        kept.sort(key=lambda t: (t.observations[0].frame_index, t.track_id))
        for n, track in enumerate(kept):
            track.track_id = n
            track.appearance = None
        return sorted(kept, key=lambda t: (-len(t), t.track_id))


def track_garments(frames: Iterable[VideoFrame], parser, encoder, *,
                   iou_weight: float = IOU_WEIGHT, min_affinity: float = MIN_AFFINITY,
                   max_gap: int = MAX_GAP, min_frames: int = MIN_FRAMES,
                   fill: tuple[int, int, int] | None = None) -> list[Track]:
    """Garment tracks over sampled frames (consumed one at a time: a generator from
    :func:`vestis.video.reader.sample_frames` streams). ``parser``: a
    :class:`vestis.detect.GarmentParser`; ``encoder``: the catalog's
    :class:`vestis.models.Encoder`. See the module's docstring for the rules."""
    tracker = GarmentTracker(parser, encoder, iou_weight=iou_weight, min_affinity=min_affinity,
                             max_gap=max_gap, min_frames=min_frames, fill=fill)
    for frame in frames:
        tracker.update(frame)
    return tracker.finish()

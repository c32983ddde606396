"""Reading a video frame by frame: :func:`probe` its header, :func:`sample_frames` from it.

Sampling follows Video2Shop and "Watch fashion shows" (survey): neighbouring frames barely
differ, so every 25th decoded frame is kept; the opening of a video (often a title or an
empty set) is skipped, but never all of a short clip; near-duplicate frames (a static shot)
are dropped.

Frames are decoded one at a time and only the sampled ones become images, so memory does
not grow with the video's length. Times come from each frame's ``pts`` and its stream's
``time_base``, so variable-frame-rate videos (phones) get true times. The display matrix's
rotation (``VideoFrame.rotation`` in PyAV) is applied, so a portrait phone video comes out
upright.

Damaged files: a missing, empty, unreadable or video-less file raises :class:`VideoError`
when :func:`sample_frames` is called. Damage found while decoding (a packet the decoder
rejects, a stream that ends well before its declared duration) does not lose what came
before it: the frames before the damage are yielded, the decoder skips the bad packets and
resumes at the next frame it can decode, and one :class:`VideoWarning` names the damage
when the generator ends. With ``strict=True`` the first damage raises :class:`VideoError`
instead (after the frames before it were yielded).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vestis.defaults import DEFAULT_EVERY  # re-exported: keep every Nth decoded frame

try:
    import av
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("vestis.video needs PyAV: pip install av") from exc

#: Seconds of the opening skipped by default ...
DEFAULT_SKIP = 0.5
#: ... but never more than this share of a video whose duration is known.
MAX_SKIP_SHARE = 0.25
#: Mean absolute difference (0-255) of two frames' grey thumbnails below which the later
#: frame is a near-duplicate of the earlier one and is dropped.
DEFAULT_DEDUP = 3.0
#: Side of the grey thumbnail the duplicate test compares.
THUMB_SIDE = 32
#: Consecutive undecodable packets after which a file is given up as unreadable.
MAX_BAD_PACKETS = 50
#: A stream that ends this many seconds (and 10%) before its declared duration is truncated.
TRUNCATION_SLACK_S = 0.5


class VideoError(ValueError):
    """A video could not be read. ``source`` names the file; ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class VideoWarning(UserWarning):
    """A video was read only in part: damaged packets were skipped, or it ends early."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says. ``width``/``height`` are as displayed (rotation applied);
    ``duration_s``, ``fps`` and ``frames`` are ``None`` when the container does not say."""

    path: str
    width: int
    height: int
    duration_s: float | None
    fps: float | None
    frames: int | None
    rotation: int
    codec: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """One sampled frame: its decode ``index`` (0-based), time in seconds from the stream's
    start, and the upright RGB image."""

    index: int
    time_s: float
    image: Image.Image


@dataclass
class _Damage:
    """Damage met while decoding: where it started and how many packets were lost."""

    first_time_s: float | None = None
    first_reason: str = ""
    bad_packets: int = 0
    frames_before: int = 0
    notes: list[str] = field(default_factory=list)


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path).expanduser()
    name = str(path)
    if not path.exists():
        raise VideoError(name, "no such file")
    if not path.is_file():
        raise VideoError(name, "not a file")
    if path.stat().st_size == 0:
        raise VideoError(name, "empty file (0 bytes)")
    try:
        container = av.open(name, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(name, "not a readable video: its header is corrupt or of an unknown "
                         "format (an MP4 cut short before its index also reads so) "
                         f"[{_ffmpeg_reason(exc)}]") from exc
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        found = f" (only {', '.join(kinds)})" if kinds else ""
        raise VideoError(name, f"has no video stream{found}")
    return container


def _ffmpeg_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _stream_facts(container, stream) -> tuple[float | None, float | None, int | None]:
    """(duration in seconds, average fps, frame count), each ``None`` when unknown."""
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    frames = int(stream.frames) if stream.frames else None
    return (duration if duration and duration > 0 else None), fps, frames


def _start_time(stream) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def upright(image: Image.Image, rotation: int | float) -> Image.Image:
    """``image`` turned by a display matrix's counter-clockwise ``rotation`` (degrees)."""
    turn = round(rotation) % 360
    exact = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_270}
    if turn == 0:
        return image
    if turn in exact:
        return image.transpose(exact[turn])
    return image.rotate(turn, expand=True, resample=Image.Resampling.BILINEAR)


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale)), max(2, round(height * scale))


def _to_image(frame: av.VideoFrame, max_side: int | None) -> Image.Image:
    width, height = _scaled_size(frame.width, frame.height, max_side)
    if (width, height) == (frame.width, frame.height):
        image = frame.to_image()
    else:
        image = frame.to_image(width=width, height=height, interpolation="AREA")
    return upright(image.convert("RGB"), frame.rotation or 0)


def _thumb(frame: av.VideoFrame) -> np.ndarray:
    """A small grey copy for the duplicate test (rotation does not matter for it)."""
    grey = frame.reformat(width=THUMB_SIDE, height=THUMB_SIDE, format="gray")
    return grey.to_ndarray()[:THUMB_SIDE, :THUMB_SIDE].astype(np.int16)


def probe(path: str | Path) -> VideoInfo:
    """The first video stream's size (as displayed), duration, frame rate, frame count,
    rotation and codec. Decodes one frame (for the rotation); raises :class:`VideoError`."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        duration, fps, frames = _stream_facts(container, stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        rotation = 0
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as exc:
            raise VideoError(str(path), f"its first frame cannot be decoded "
                             f"[{_ffmpeg_reason(exc)}]") from exc
        if first is not None:
            width, height, rotation = first.width, first.height, int(first.rotation or 0)
        if round(rotation) % 180 == 90:
            width, height = height, width
        return VideoInfo(str(path), width, height, duration, fps, frames, rotation,
                         stream.codec_context.name)
    finally:
        container.close()


def sample_frames(path: str | Path, every: int = DEFAULT_EVERY, skip_seconds: float = DEFAULT_SKIP,
                  dedup: float | None = DEFAULT_DEDUP, max_side: int | None = None,
                  progress: bool = False, *, every_seconds: float | None = None,
                  strict: bool = False) -> Iterator[VideoFrame]:
    """Sampled frames of a video, decoded one at a time (a generator).

    ``every``: keep every Nth decoded frame (index 0, N, 2N, ...); ``every_seconds`` instead
    keeps the first frame at or after each multiple of that many seconds (steadier on a
    variable frame rate). ``skip_seconds``: drop sampled frames before this time, capped at
    a quarter of a video of known duration; if the video ends before anything was kept, the
    last frame sampled in the opening is yielded. ``dedup``: drop a frame whose 32x32 grey
    thumbnail differs from the last kept frame's by less than this mean absolute difference
    (0-255; ``None`` or 0 keeps all). ``max_side``: downscale frames to at most this many
    pixels on the long side. ``progress``: a tqdm bar over decoded frames.

    Raises :class:`VideoError` at once for a missing, empty, unreadable or video-less file;
    damage met later is skipped and reported by one :class:`VideoWarning` at the end, or
    raised as :class:`VideoError` with ``strict`` (see the module's docstring).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if every_seconds is not None and every_seconds <= 0:
        raise ValueError(f"every_seconds must be positive, got {every_seconds}")
    if skip_seconds < 0:
        raise ValueError(f"skip_seconds must be at least 0, got {skip_seconds}")
    container = _open(path)
    return _sample(container, str(path), every, every_seconds, skip_seconds, dedup or 0.0,
                   max_side, progress, strict)


def _sample(container, name: str, every: int, every_seconds: float | None, skip: float,
            dedup: float, max_side: int | None, progress: bool, strict: bool
            ) -> Iterator[VideoFrame]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration, fps, frames = _stream_facts(container, stream)
    if duration is not None:
        skip = min(skip, duration * MAX_SKIP_SHARE)
    total = frames or (round(duration * fps) if duration and fps else None)
    bar = tqdm(total=total, desc="decoding", unit="frame", disable=not progress)
    damage = _Damage()
    due = _Schedule(every, every_seconds)
    last_thumb, opening, kept, last_time = None, None, 0, None
    try:
        for index, frame, time_s in _decoded(container, stream, name, fps, damage, strict):
            bar.update()
            last_time = time_s
            if not due(index, time_s):
                continue
            if time_s < skip:
                opening = (index, time_s, frame)
                continue
            thumb = _thumb(frame)
            if dedup and last_thumb is not None and np.abs(thumb - last_thumb).mean() < dedup:
                continue
            last_thumb, kept = thumb, kept + 1
            yield VideoFrame(index, time_s, _to_image(frame, max_side))
        if not kept and opening is not None:
            index, time_s, frame = opening
            yield VideoFrame(index, time_s, _to_image(frame, max_side))
    finally:
        bar.close()
        container.close()
    _check_end(name, damage, duration, fps, last_time, strict)


class _Schedule:
    """Which decoded frames are sampled: by index, or by time on a fixed grid."""

    def __init__(self, every: int, every_seconds: float | None):
        self.every, self.every_seconds, self.next_time = every, every_seconds, 0.0

    def __call__(self, index: int, time_s: float) -> bool:
        if self.every_seconds is None:
            return index % self.every == 0
        if time_s + 1e-9 < self.next_time:
            return False
        steps = math.floor(time_s / self.every_seconds + 1e-9) + 1
        self.next_time = steps * self.every_seconds
        return True


def _decoded(container, stream, name: str, fps: float | None, damage: _Damage, strict: bool
             ) -> Iterator[tuple[int, av.VideoFrame, float]]:
    """(index, frame, seconds from the stream's start) for every decodable frame. A packet
    the decoder rejects is skipped (recorded in ``damage``, or raised with ``strict``)."""
    start, index, last_time, bad_run = _start_time(stream), 0, None, 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
            frames = packet.decode()
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            bad_run += 1
            _record(damage, name, last_time, index, _ffmpeg_reason(exc), strict)
            if bad_run >= MAX_BAD_PACKETS:
                damage.notes.append(f"gave up after {bad_run} undecodable packets in a row")
                return
            continue
        bad_run = 0
        for frame in frames:
            last_time = _frame_time(frame, start, index, fps, last_time)
            yield index, frame, last_time
            index += 1


def _record(damage: _Damage, name: str, time_s: float | None, frames: int, reason: str,
            strict: bool) -> None:
    at = f"after {time_s:.2f} s" if time_s is not None else "before the first frame"
    if strict:
        raise VideoError(name, f"damaged data {at} ({frames} frames decoded): {reason}")
    if damage.first_time_s is None and not damage.bad_packets:
        damage.first_time_s, damage.first_reason, damage.frames_before = time_s, reason, frames
    damage.bad_packets += 1


def _frame_time(frame: av.VideoFrame, start: float, index: int, fps: float | None,
                last_time: float | None) -> float:
    """Seconds from the stream's start: the frame's pts, else one frame after the last."""
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base) - start
    step = 1.0 / fps if fps else 0.04
    return 0.0 if last_time is None else last_time + step


def _check_end(name: str, damage: _Damage, duration: float | None, fps: float | None,
               last_time: float | None, strict: bool) -> None:
    """Report damage, or a stream that stopped well before its declared duration."""
    problems = []
    if damage.bad_packets:
        at = (f"{damage.first_time_s:.2f} s" if damage.first_time_s is not None
              else "the start")
        problems.append(f"{damage.bad_packets} damaged packet(s) skipped, the first after {at} "
                        f"({damage.frames_before} frames decoded before it): "
                        f"{damage.first_reason}")
    problems += damage.notes
    if duration is not None:
        end = (last_time or 0.0) + (1.0 / fps if fps else 0.0)
        if end < duration - TRUNCATION_SLACK_S and end < 0.9 * duration:
            problems.append(f"the video stops at {end:.2f} s of the {duration:.2f} s its header "
                            "declares: the file looks truncated")
    if not problems:
        return
    message = f"{name}: read in part; " + "; ".join(problems)
    if strict:
        raise VideoError(name, "read in part; " + "; ".join(problems))
    warnings.warn(message, VideoWarning, stacklevel=3)

"""Synthetic video clips for tests and benchmarks, written with PyAV.

These are **synthetic clips, not real video**: one still shop photo (or a short sequence of
photos of one item, cut one after another) filmed by a virtual camera that pans, zooms and
tilts a little, under slowly drifting light, with dark blobs passing in front as occluders.
They exercise the video pipeline (decoding, sampling, tracking, fusion) on real garments,
but they have none of a real video's motion blur, body motion, pose change or compression
history, so figures measured on them are not figures for real videos.

Clips are H.264 (libx264) when the PyAV wheel has the encoder, else MPEG-4 part 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vestis.images import ImageSource, load_image

try:
    import av
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("vestis.video needs PyAV: pip install av") from exc

MOTIONS = ("pan", "zoom", "mixed", "static")
#: Studio-wall grey around the photo when the camera sees past its edges.
BACKGROUND = (200, 200, 196)
#: Time base of variable-frame-rate clips (milliseconds).
VFR_TIME_BASE = Fraction(1, 1000)


def video_codec() -> str:
    """The encoder synthetic clips use: ``libx264`` when available, else ``mpeg4``."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def make_clip(photos: ImageSource | Sequence[ImageSource], out: str | Path, seconds: float = 6.0,
              fps: int = 25, size: tuple[int, int] = (320, 240), motion: str = "pan",
              seed: int = 0, rotation_deg: int = 0, occlusion: bool = True,
              lighting_drift: bool = True, *, vfr: bool = False) -> Path:
    """Write a synthetic clip (see the module's docstring) of ``photos`` to ``out``.

    ``photos``: one photo, or several of one item shown one after another (equal shares of
    the clip, hard cuts). ``motion``: ``pan`` (the camera sweeps across the garment, close
    up), ``zoom`` (from the whole photo in to a close-up), ``mixed`` (a random one per
    photo), ``static`` (a still camera: every frame alike). ``rotation_deg`` (a multiple of
    90): stored in the container's display matrix, the pixels turned the other way, so a
    reader that applies it sees the clip upright. ``vfr``: irregular frame durations (a
    millisecond time base, mean ``fps``). Returns ``out``.
    """
    photos = _as_list(photos)
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")
    if seconds <= 0 or fps <= 0:
        raise ValueError("seconds and fps must be positive")
    rng = np.random.default_rng(seed)
    images = [_prepared(photo, size) for photo in photos]
    times = _frame_times(seconds, fps, vfr, rng)
    scene = _Scene(images, size, seconds, motion, rng, occlusion, lighting_drift)
    frames = ((t, scene.render(t)) for t in times)
    return write_clip(frames, out, fps, size, rotation_deg=rotation_deg, vfr=vfr)


def make_long_clip(photos: Sequence[ImageSource], out: str | Path, minutes: float = 10.0,
                   fps: int = 25, size: tuple[int, int] = (128, 96), segment_seconds: float = 8.0,
                   seed: int = 0) -> Path:
    """A long, small synthetic clip, cheap to write (for streaming and memory checks): the
    ``photos`` (any items) in turn, each filmed for ``segment_seconds`` with random motion,
    written one frame at a time."""
    photos = _as_list(photos)
    rng = np.random.default_rng(seed)
    images = [_prepared(photo, size) for photo in photos]
    segments = max(1, math.ceil(minutes * 60 / segment_seconds))

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        step = 1.0 / fps
        for n in range(segments):
            scene = _Scene([images[n % len(images)]], size, segment_seconds, "mixed", rng,
                           occlusion=True, lighting_drift=True)
            start = n * segment_seconds
            for i in range(round(segment_seconds * fps)):
                yield start + i * step, scene.render(i * step)

    return write_clip(frames(), out, fps, size)


def write_clip(frames, out: str | Path, fps: int, size: tuple[int, int], *,
               rotation_deg: int = 0, vfr: bool = False) -> Path:
    """Encode (time in seconds, H x W x 3 uint8 RGB) pairs into ``out`` (its suffix picks
    the container). With ``rotation_deg`` the frames are stored turned clockwise by it and
    the display matrix says to turn them back."""
    if rotation_deg % 90:
        raise ValueError(f"rotation_deg must be a multiple of 90, got {rotation_deg}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    width, height = _even(size[0]), _even(size[1])
    turn = rotation_deg % 360
    if turn in (90, 270):
        width, height = height, width
    with av.open(str(out), "w") as container:
        stream = _video_stream(container, fps, width, height, vfr)
        if turn:
            stream.set_display_rotation(turn)
        for time_s, array in frames:
            frame = av.VideoFrame.from_ndarray(_stored(array, turn), format="rgb24")
            if vfr:
                frame.pts, frame.time_base = round(time_s * 1000), VFR_TIME_BASE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def _video_stream(container, fps: int, width: int, height: int, vfr: bool):
    codec = video_codec()
    options = {"preset": "veryfast", "crf": "23"} if codec == "libx264" else {"qscale": "4"}
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if vfr:
        stream.codec_context.time_base = VFR_TIME_BASE
        stream.time_base = VFR_TIME_BASE
    return stream


def _stored(array: np.ndarray, turn: int) -> np.ndarray:
    """The pixels as stored: turned clockwise by ``turn`` so that the display matrix's
    counter-clockwise turn shows them upright."""
    return np.ascontiguousarray(np.rot90(array, k=-(turn // 90))) if turn else array


def _as_list(photos) -> list[ImageSource]:
    if isinstance(photos, (str, Path, bytes, Image.Image)):
        return [photos]
    photos = list(photos)
    if not photos:
        raise ValueError("no photos to film")
    return photos


def _even(n: int) -> int:
    return max(2, n - n % 2)


def _prepared(photo: ImageSource, size: tuple[int, int]) -> Image.Image:
    """The photo, downscaled to about twice the clip's height (a cheap source to sample)."""
    image = load_image(photo)
    limit = 2 * max(size)
    if max(image.size) > limit:
        image = image.copy()
        image.thumbnail((limit, limit), Image.Resampling.LANCZOS)
    return image


def _frame_times(seconds: float, fps: int, vfr: bool, rng: np.random.Generator) -> list[float]:
    if not vfr:
        return [i / fps for i in range(max(1, round(seconds * fps)))]
    times, t = [], 0.0
    while t < seconds:  # durations 0.5x to 1.5x the mean, in whole milliseconds
        times.append(t)
        t = round(t + rng.uniform(0.5, 1.5) / fps, 3)
    return times


class _Scene:
    """A virtual camera over a sequence of photos: its path, light and occluders."""

    def __init__(self, photos: list[Image.Image], size: tuple[int, int], seconds: float,
                 motion: str, rng: np.random.Generator, occlusion: bool, lighting_drift: bool):
        self.photos, self.size, self.seconds = photos, (_even(size[0]), _even(size[1])), seconds
        self.shot = seconds / len(photos)
        self.paths = [_camera_path(motion if motion != "mixed" else
                                   str(rng.choice(["pan", "zoom"])), rng) for _ in photos]
        self.wobble = rng.uniform(0, 2 * math.pi, 1)
        self.light = _light(rng) if lighting_drift else None
        self.blobs = _blobs(rng, seconds, self.size) if occlusion else []

    def render(self, t: float) -> np.ndarray:
        shot = min(int(t / self.shot), len(self.photos) - 1)
        u = min(1.0, max(0.0, (t - shot * self.shot) / self.shot))
        photo = self.photos[shot]
        path = self.paths[shot]
        cx, cy, zoom, angle = path(u)
        if path.moving:  # a hand-held camera's slow wobble
            angle += 2.5 * math.sin(2 * math.pi * t / 3.0 + self.wobble[0])
        frame = _view(photo, self.size, (cx, cy), zoom, angle)
        for blob in self.blobs:
            blob.draw(frame, t)
        array = np.asarray(frame, dtype=np.uint8)
        if self.light is not None:
            array = self.light(array, t / max(self.seconds, 1e-6))
        return array


class _Path:
    """Camera centre (fractions of the photo), zoom (1 = whole photo height) and tilt at
    ``u`` in [0, 1] of a shot."""

    def __init__(self, start, end, moving: bool = True):
        self.start, self.end, self.moving = np.array(start, float), np.array(end, float), moving

    def __call__(self, u: float) -> tuple[float, float, float, float]:
        eased = 0.5 - 0.5 * math.cos(math.pi * u)
        cx, cy, zoom, angle = self.start + (self.end - self.start) * eased
        return float(cx), float(cy), float(zoom), float(angle)


def _camera_path(motion: str, rng: np.random.Generator) -> _Path:
    if motion == "static":
        return _Path((0.5, 0.5, 1.0, 0.0), (0.5, 0.5, 1.0, 0.0), moving=False)
    tilt = rng.uniform(-3, 3, 2)
    if motion == "zoom":
        end = (rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.55), rng.uniform(1.6, 2.0), tilt[1])
        return _Path((0.5, 0.5, 1.0, tilt[0]), end)
    zoom = rng.uniform(1.2, 1.5)
    side = rng.choice([-1, 1])
    start = (0.5 - side * 0.18, rng.uniform(0.35, 0.5), zoom, tilt[0])
    end = (0.5 + side * 0.18, rng.uniform(0.4, 0.6), zoom * rng.uniform(0.9, 1.1), tilt[1])
    return _Path(start, end)


def _view(photo: Image.Image, size: tuple[int, int], centre: tuple[float, float], zoom: float,
          angle_deg: float) -> Image.Image:
    """What a camera of ``size`` sees of ``photo``: centred on ``centre`` (fractions of the
    photo), ``zoom`` x the scale at which the photo's height fills the frame, tilted."""
    width, height = size
    scale = zoom * height / photo.height  # output pixels per photo pixel
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    px, py = centre[0] * photo.width, centre[1] * photo.height
    # output (x, y) -> photo (a x + b y + c, d x + e y + f), rotating about the frame centre
    a, b, d, e = cos, sin, -sin, cos
    c = px - a * width / 2 - b * height / 2
    f = py - d * width / 2 - e * height / 2
    return photo.transform(size, Image.Transform.AFFINE, (a, b, c, d, e, f),
                           resample=Image.Resampling.BILINEAR, fillcolor=BACKGROUND)


def _light(rng: np.random.Generator):
    """Slow gain and colour drift over the clip (u in [0, 1])."""
    phase, tint = rng.uniform(0, 2 * math.pi), rng.uniform(-0.06, 0.06, 3)

    def apply(array: np.ndarray, u: float) -> np.ndarray:
        gain = 1.0 + 0.15 * math.sin(2 * math.pi * u + phase) + tint * u
        return np.clip(array * gain, 0, 255).astype(np.uint8)

    return apply


class _Blob:
    """A dark ellipse crossing the frame between two times (a passer-by, a hand)."""

    def __init__(self, rng: np.random.Generator, seconds: float, size: tuple[int, int]):
        width, height = size
        self.t0 = rng.uniform(0, 0.7) * seconds
        self.t1 = self.t0 + rng.uniform(0.15, 0.3) * seconds
        self.radius = (rng.uniform(0.08, 0.15) * width, rng.uniform(0.15, 0.3) * height)
        y = rng.uniform(0.2, 0.8) * height
        left, right = -self.radius[0], width + self.radius[0]
        self.start, self.end = ((left, y), (right, y)) if rng.random() < 0.5 else (
            (right, y), (left, y))
        self.colour = tuple(int(v) for v in rng.integers(20, 90, 3))

    def draw(self, frame: Image.Image, t: float) -> None:
        if not self.t0 <= t <= self.t1:
            return
        u = (t - self.t0) / (self.t1 - self.t0)
        x = self.start[0] + (self.end[0] - self.start[0]) * u
        y = self.start[1] + (self.end[1] - self.start[1]) * u
        rx, ry = self.radius
        ImageDraw.Draw(frame).ellipse((x - rx, y - ry, x + rx, y + ry), fill=self.colour)


def _blobs(rng: np.random.Generator, seconds: float, size: tuple[int, int]) -> list[_Blob]:
    return [_Blob(rng, seconds, size) for _ in range(int(rng.integers(1, 3)))]

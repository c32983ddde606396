"""The one door for pixels: decode, validate and preprocess images.

Every image that enters vestis goes through :func:`load_image`, which returns an RGB
``PIL.Image`` or raises :class:`ImageError` naming the source and the reason.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image
#: The one box type: (x1, y1, x2, y2) in pixels, x2/y2 exclusive.
Box = tuple[int, int, int, int]

#: Images with more pixels than this are refused as decompression bombs (about 11.5k x 11.5k,
#: above any phone photo). Checked from the header, before any pixel is decoded.
MAX_PIXELS = 2**27
#: The server's cap (:func:`load_reduced` callers in ``vestis.serve``): 32 Mi pixels, a
#: quarter of :data:`MAX_PIXELS`, still above a 24-megapixel camera's photo.
SERVER_MAX_PIXELS = 2**25
#: The long side the server works at: big enough for the parser (384) and the encoder's
#: garment crops, small enough that masks and crops stay a few MB.
WORK_SIDE = 1536

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Photo formats Pillow cannot decode here: a folder's files of these kinds are reported
#: (one error each, naming the format), never skipped silently.
UNSUPPORTED_SUFFIXES = frozenset({".heic", ".heif"})

# PIL must never decode half a file silently: a truncated JPEG is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image could not be used. ``source`` names the file; ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def describe_source(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return f"<{len(source)} bytes>"


def load_image(source: ImageSource, *, draft_size: int | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path, raw bytes or a PIL image) into an upright RGB image.

    ``draft_size`` lets JPEG decoding downscale by a power of two while keeping both
    sides at least that large, which is much faster for big photos. Images over
    ``max_pixels`` are refused from their header, before any pixel is decoded.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source), name)
    data = _read_bytes(source, name)
    with _decoding(name):
        image = Image.open(io.BytesIO(data))
        _check_size(image, name, max_pixels)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    return _to_rgb(_upright(image, name), name)


@dataclass(frozen=True)
class Reduced:
    """A photo decoded at most ``max_side`` on its long side, and its full upright size.

    Invariant: ``image`` is upright RGB with the aspect ratio of ``width`` x ``height``
    (to rounding); a box in ``image`` times :attr:`scale` is the box in the full photo."""

    image: Image.Image
    width: int
    height: int

    @property
    def scale(self) -> tuple[float, float]:
        return self.width / self.image.width, self.height / self.image.height

    def full_box(self, box: Box) -> Box:
        """``box`` (in :attr:`image`) in the full photo's pixels, clipped to it."""
        sx, sy = self.scale
        x1, y1, x2, y2 = box
        return (max(0, int(x1 * sx)), max(0, int(y1 * sy)),
                min(self.width, int(np.ceil(x2 * sx))), min(self.height, int(np.ceil(y2 * sy))))


def load_reduced(source: ImageSource, *, max_side: int = WORK_SIDE,
                 max_pixels: int = SERVER_MAX_PIXELS) -> Reduced:
    """Decode ``source`` straight to at most ``max_side`` on its long side.

    Memory stays near the smaller of the file's pixels and ``max_side`` squared: JPEG
    decodes at 1/2, 1/4 or 1/8 scale (draft), other formats are reduced by an integer
    factor right after decoding, before any colour conversion; images over ``max_pixels``
    are refused from their header. Raises :class:`ImageError` like :func:`load_image`."""
    name = describe_source(source)
    if isinstance(source, Image.Image):
        image = load_image(source).copy()  # thumbnail() below must not change the caller's
        full = image.size
    else:
        data = _read_bytes(source, name)
        with _decoding(name):
            image = Image.open(io.BytesIO(data))
            _check_size(image, name, max_pixels)
            stored = image.size
            if image.format == "JPEG":
                shrink = max_side / max(stored)
                image.draft("RGB", (max(1, int(stored[0] * shrink)),
                                    max(1, int(stored[1] * shrink))))
            image.load()
            image = _reduce(image, max_side)
            shape = image.size
        image = _to_rgb(_upright(image, name), name)
        swapped = image.size != shape and image.size == shape[::-1]
        full = stored[::-1] if swapped else stored
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    return Reduced(image, full[0], full[1])


def _reduce(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` shrunk by the largest integer factor that keeps its long side at least
    ``max_side``. Palette and 1-bit images become RGB(A) and L first (averaging palette
    indices would mix unrelated colours); modes Pillow cannot reduce are left as they are."""
    factor = max(image.size) // max_side
    if factor < 2:
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    try:
        return image.reduce(factor)
    except (ValueError, NotImplementedError):
        return image


class _decoding:
    """Turns every decoder failure inside the block into an :class:`ImageError`."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # Our own limit replaces PIL's warning; PIL still errors past twice its own.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def __exit__(self, kind, exc, traceback) -> bool:
        self._warnings.__exit__(None, None, None)
        if exc is None or isinstance(exc, ImageError):
            return False
        name = self.name
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError(name, f"refused as a decompression bomb ({exc})") from None
        if isinstance(exc, UnidentifiedImageError):
            if Path(name).suffix.lower() in UNSUPPORTED_SUFFIXES:
                raise ImageError(name, f"{Path(name).suffix[1:].upper()} photos are not "
                                 "supported; convert them to JPEG or PNG") from None
            raise ImageError(name, "not an image file (unrecognised format)") from None
        if isinstance(exc, OSError):
            raise ImageError(name, f"truncated or corrupt image data ({exc})") from None
        if isinstance(exc, (ValueError, SyntaxError, EOFError)):
            raise ImageError(name, f"corrupt image data ({exc})") from None
        return False


#: ``scheme://...``: an image named by a URI (``file://``, ``s3://``, ``gs://``, ``https://``).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_uri(source: object) -> bool:
    """Whether ``source`` is a URI string such as ``file:///photos/a.jpg`` or ``s3://b/a.jpg``
    (a CSV's image column may hold them; they are read through fsspec)."""
    return isinstance(source, str) and _URI.match(source) is not None


def read_uri(uri: str) -> bytes:
    """The bytes a URI names, through fsspec (``file://`` always; ``s3://``, ``gs://`` and
    ``https://`` when s3fs, gcsfs or aiohttp are installed). Raises ``OSError`` (such as
    ``FileNotFoundError``) or ``ImportError`` for a scheme whose package is missing."""
    import fsspec

    with fsspec.open(uri, "rb") as handle:
        return handle.read()


def content_hash(data: bytes, box: Box | None = None) -> str:
    """The hash a catalog keeps of an image file's bytes (and its box, when it has one)."""
    digest = hashlib.sha256(data)
    if box is not None:
        digest.update(repr(tuple(box)).encode())
    return digest.hexdigest()


def file_digest(path: str | Path, box: Box | None = None) -> tuple[str | None, str | None]:
    """``(content hash, None)`` of a file or URI, or ``(None, reason)`` when it cannot be
    read or is empty."""
    try:
        data = read_uri(path) if is_uri(path) else Path(path).read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except (ImportError, ValueError) as exc:  # a URI scheme whose fsspec package is missing
        return None, f"cannot be read ({exc})"
    if not data:
        return None, "empty file (0 bytes)"
    return content_hash(data, box), None


def _read_bytes(source: ImageSource, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif is_uri(source):
        try:
            data = read_uri(source)
        except FileNotFoundError:
            raise ImageError(name, "file not found") from None
        except IsADirectoryError:
            raise ImageError(name, "is a directory, not an image file") from None
        except (OSError, ImportError, ValueError) as exc:
            raise ImageError(name, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
                             ) from None
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(name, "file not found")
        if path.is_dir():
            raise ImageError(name, "is a directory, not an image file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(name, f"cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    return data


def _check_size(image: Image.Image, name: str, max_pixels: int = MAX_PIXELS) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(name, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            name,
            f"refused as a decompression bomb ({width}x{height} pixels, limit {max_pixels})",
        )


def _upright(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good photo
        return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        gray = ((array - array.min()) / span * 255.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"unsupported colour mode {mode} ({exc})") from None


def crop_box(image: Image.Image, box: Box | None) -> Image.Image:
    """Crop ``box`` (x1, y1, x2, y2), clipped to the image; ``None`` keeps the whole image."""
    if box is None:
        return image
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = sorted((max(0, min(x1, image.width)), max(0, min(x2, image.width))))
    y1, y2 = sorted((max(0, min(y1, image.height)), max(0, min(y2, image.height))))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return image
    return image.crop((x1, y1, x2, y2))


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels: a square input of ``size`` pixels.

    The image is resized keeping its aspect ratio and padded to a square, never
    centre-cropped, so no part of the garment is lost. Values are normalised as
    ``(x - mean) / std`` per channel.
    """

    size: int = 224
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    pad: str = "edge"  # "edge": the median colour of the image border; or "constant"
    pad_value: tuple[int, int, int] = (127, 127, 127)

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pad": self.pad,
            "pad_value": list(self.pad_value),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(
            size=int(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            pad=data.get("pad", "edge"),
            pad_value=tuple(data.get("pad_value", (127, 127, 127))),
        )

    def letterbox(self, image: Image.Image) -> Image.Image:
        """Resize so the longer side is ``size`` and pad the shorter one to a square."""
        scale = self.size / max(image.width, image.height)
        width = max(1, round(image.width * scale))
        height = max(1, round(image.height * scale))
        resized = image.resize((width, height), Image.BICUBIC, reducing_gap=3.0)
        fill = self._pad_colour(resized)
        canvas = Image.new("RGB", (self.size, self.size), fill)
        canvas.paste(resized, ((self.size - width) // 2, (self.size - height) // 2))
        return canvas

    def _pad_colour(self, image: Image.Image) -> tuple[int, int, int]:
        if self.pad != "edge":
            return tuple(self.pad_value)
        array = np.asarray(image)
        border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
        return tuple(int(v) for v in np.median(border, axis=0))

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Letterbox and normalise into a float32 CHW array."""
        array = np.asarray(self.letterbox(image), dtype=np.float32)
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def __call__(self, source: ImageSource, box: Box | None = None) -> np.ndarray:
        # JPEG draft mode rescales the pixels, so it is used only when no box must be cut.
        image = load_image(source, draft_size=None if box is not None else self.size * 2)
        return self.to_array(crop_box(image, box))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self.to_array(image) for image in images])


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES

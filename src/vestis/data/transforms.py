"""Training augmentations in plain PIL and numpy.

Geometry and lighting change; hue never does. The colour of a garment is often the only
thing that tells two items apart (``mh01-gray`` vs ``mh01-red``), so there is no hue or
saturation jitter and no channel shuffle. Brightness and contrast change all channels
alike. After augmenting, the model's :class:`~vestis.images.Preprocess` letterboxes and
normalises the image into a float32 CHW array.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vestis.images import Preprocess

Range = tuple[float, float]
#: Config keys refused on purpose: they change colour, which identifies the item.
COLOUR_KEYS = frozenset({"hue", "saturation", "channel_shuffle", "color_jitter", "colour_jitter"})


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; a zero (or a (1, 1) range) turns a step off.

    ``crop_scale``/``crop_ratio``: area fraction and aspect ratio of the random crop.
    ``scale``: zoom-out factor range (the image shrinks inside a padded frame).
    ``flip``, ``blur``: probabilities. ``rotate``: maximum degrees either way.
    ``perspective``: maximum corner shift as a fraction of the side.
    ``brightness``, ``contrast``: maximum relative change.
    """

    crop_scale: Range = (0.6, 1.0)
    crop_ratio: Range = (0.8, 1.25)
    scale: Range = (0.85, 1.0)
    flip: float = 0.5
    rotate: float = 10.0
    perspective: float = 0.1
    blur: float = 0.2
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        _check_range("crop_scale", self.crop_scale, 0.05, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 0.2, 5.0)
        _check_range("scale", self.scale, 0.3, 1.0)
        for name, value, top in (
            ("flip", self.flip, 1.0),
            ("blur", self.blur, 1.0),
            ("rotate", self.rotate, 45.0),
            ("perspective", self.perspective, 0.4),
            ("brightness", self.brightness, 0.9),
            ("contrast", self.contrast, 0.9),
        ):
            if not 0.0 <= float(value) <= top:
                raise ValueError(f"augmentation {name!r} must be in [0, {top}], got {value}")

    @classmethod
    def from_dict(cls, config: Mapping | None) -> AugmentConfig:
        config = dict(config or {})
        refused = sorted(COLOUR_KEYS & set(config))
        if refused:
            raise ValueError(
                f"colour augmentations {refused} are not supported: colour tells items apart"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown augmentation keys {unknown}; known: {sorted(known)}")
        for name in ("crop_scale", "crop_ratio", "scale"):
            if name in config:
                config[name] = _as_range(name, config[name])
        return cls(**config)


def _as_range(name: str, value) -> Range:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"augmentation {name!r} must be a [low, high] pair, got {value!r}"
        ) from None
    return (low, high)


def _check_range(name: str, value: Range, low: float, high: float) -> None:
    if not low <= value[0] <= value[1] <= high:
        raise ValueError(f"augmentation {name!r} must satisfy {low} <= low <= high <= {high}")


class TrainTransform:
    """PIL image -> augmented, letterboxed, normalised float32 CHW array.

    Randomness comes from an own ``random.Random(seed)`` (or the ``rng`` passed to a
    call), so a seed fixes the sequence of augmentations.
    """

    def __init__(self, config: AugmentConfig, preprocess: Preprocess, seed: int | None = None):
        self.config = config
        self.preprocess = preprocess
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        return self.preprocess.to_array(self.augment(image, rng))

    def augment(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """The augmented PIL image, before letterboxing."""
        rng = rng or self.rng
        c = self.config
        fill = border_colour(image)
        image = random_resized_crop(image, c.crop_scale, c.crop_ratio, rng)
        image = zoom_out(image, rng.uniform(*c.scale), fill, rng)
        if c.rotate:
            angle = rng.uniform(-c.rotate, c.rotate)
            image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=fill)
        if c.perspective:
            image = random_perspective(image, c.perspective, fill, rng)
        if rng.random() < c.flip:
            image = ImageOps.mirror(image)
        image = adjust_light(image, c.brightness, c.contrast, rng)
        if rng.random() < c.blur:
            # Blur in output pixels: a 600 px photo needs a wider kernel than a 224 px one.
            radius = rng.uniform(0.3, 1.2) * max(image.size) / self.preprocess.size
            image = image.filter(ImageFilter.GaussianBlur(radius))
        return image


def build_train_transform(
    config: Mapping | AugmentConfig | None, preprocess: Preprocess, seed: int | None = None
) -> TrainTransform:
    """A training transform from a dict such as ``{"crop_scale": [0.6, 1.0], "flip": 0.5}``;
    missing keys take the :class:`AugmentConfig` defaults."""
    if not isinstance(config, AugmentConfig):
        config = AugmentConfig.from_dict(config)
    return TrainTransform(config, preprocess, seed)


def build_eval_transform(preprocess: Preprocess) -> Callable[[Image.Image], np.ndarray]:
    """No augmentation: letterbox and normalise, exactly as at search time."""
    return preprocess.to_array


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the outermost pixels: the studio background, usually."""
    array = np.asarray(image.convert("RGB"))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def random_resized_crop(
    image: Image.Image, scale: Range, ratio: Range, rng: random.Random, tries: int = 10
) -> Image.Image:
    width, height = image.size
    for _ in range(tries):
        area = width * height * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        crop_w = int(round((area * aspect) ** 0.5))
        crop_h = int(round((area / aspect) ** 0.5))
        if 1 <= crop_w <= width and 1 <= crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return image.crop((left, top, left + crop_w, top + crop_h))
    return image


def zoom_out(
    image: Image.Image, factor: float, fill: tuple[int, int, int], rng: random.Random
) -> Image.Image:
    """Place the image, at ``factor`` of the frame size, somewhere in a padded frame."""
    if factor >= 0.999:
        return image
    width, height = image.size
    frame = Image.new("RGB", (round(width / factor), round(height / factor)), fill)
    frame.paste(image, (rng.randint(0, frame.width - width), rng.randint(0, frame.height - height)))
    return frame


def random_perspective(
    image: Image.Image, strength: float, fill: tuple[int, int, int], rng: random.Random
) -> Image.Image:
    """Move each corner inwards or outwards by up to ``strength`` times half the side."""
    width, height = image.size
    corners = [(0, 0), (width, 0), (width, height), (0, height)]
    dx, dy = strength * width / 2, strength * height / 2
    moved = [(x + rng.uniform(-dx, dx), y + rng.uniform(-dy, dy)) for x, y in corners]
    coefficients = perspective_coefficients(corners, moved)
    return image.transform(
        image.size, Image.PERSPECTIVE, coefficients, Image.BICUBIC, fillcolor=fill
    )


def perspective_coefficients(output_points, input_points) -> tuple[float, ...]:
    """PIL's 8 perspective coefficients mapping output pixels to input pixels."""
    rows, targets = [], []
    for (x, y), (u, v) in zip(output_points, input_points, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        targets += [u, v]
    solution = np.linalg.solve(np.asarray(rows, float), np.asarray(targets, float))
    return tuple(float(v) for v in solution)


def adjust_light(
    image: Image.Image, brightness: float, contrast: float, rng: random.Random
) -> Image.Image:
    """Brightness and contrast, the same for every channel, so hue is kept."""
    if brightness:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - brightness, 1 + brightness))
    if contrast:
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - contrast, 1 + contrast))
    return image

"""Consumer-style views of shop photos, for self-supervised instance pairs.

:class:`ConsumerStyle` turns a studio photo into something like a street or phone photo:
the garment (cut out of its plain background) is cropped, tilted, pasted onto a real
background photo, relit and degraded. Hue never changes (see :mod:`vestis.data.transforms`).

:class:`SyntheticViews` uses it for photos without instance labels: image ``i`` becomes
``views`` samples that all carry the label ``i`` (the first may be the original), so a
:class:`~vestis.data.PKSampler` with ``k <= views`` and ``min_per_label <= views`` draws
positive pairs from them.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from vestis.data.datasets import ImageTransform, to_tensor
from vestis.data.transforms import border_colour, random_perspective
from vestis.images import is_image_path, load_image

#: Below or above these foreground fractions the photo is not a studio shot: keep it whole.
MIN_FOREGROUND, MAX_FOREGROUND = 0.03, 0.92


def list_backgrounds(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` (e.g. ``shared/data/ccp/photos``), sorted."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p))
    if not paths:
        raise ValueError(f"no background images in {folder}")
    return paths


def garment_mask(image: Image.Image, threshold: int = 24, feather: float = 2.0) -> Image.Image:
    """A soft "L" mask of everything that differs from the (near-uniform) border colour.

    Falls back to an all-white mask when the photo has no plain background.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    background = np.asarray(border_colour(image), dtype=np.int16)
    foreground = np.abs(array - background).max(axis=2) > threshold
    fraction = float(foreground.mean())
    if not MIN_FOREGROUND <= fraction <= MAX_FOREGROUND:
        return Image.new("L", image.size, 255)
    mask = Image.fromarray(foreground.astype(np.uint8) * 255)
    # Closing fills small holes (white print, highlights); opening drops speckles.
    mask = mask.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(5))
    mask = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))
    return mask.filter(ImageFilter.GaussianBlur(feather)) if feather else mask


class ConsumerStyle:
    """Make a consumer-like photo of a shop image on a random real background.

    ``size`` is the output (width, height); ``None`` keeps the shop image's size.
    """

    def __init__(
        self,
        backgrounds: Sequence[str | Path],
        rng: random.Random | int | None = None,
        *,
        size: tuple[int, int] | None = None,
        garment_height: tuple[float, float] = (0.55, 0.95),
        crop_scale: tuple[float, float] = (0.7, 1.0),
        perspective: float = 0.12,
        gamma: tuple[float, float] = (0.75, 1.35),
        brightness: tuple[float, float] = (0.75, 1.15),
        jpeg_quality: tuple[int, int] = (35, 85),
        blur: float = 0.5,
    ):
        if not backgrounds:
            raise ValueError("ConsumerStyle needs at least one background image")
        if not 0 < garment_height[0] <= garment_height[1] <= 1:
            raise ValueError(f"garment_height must be within (0, 1], got {garment_height}")
        self.backgrounds = [Path(p) for p in backgrounds]
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self.size = size
        self.garment_height = garment_height
        self.crop_scale = crop_scale
        self.perspective = perspective
        self.gamma = gamma
        self.brightness = brightness
        self.jpeg_quality = jpeg_quality
        self.blur = blur

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, shop: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """A consumer-style photo of ``shop``; ``rng`` (default: the own one) draws it."""
        rng = rng or self.rng
        shop = shop.convert("RGB")
        width, height = self.size or shop.size
        garment = self._cut_out(shop, rng)
        scene = self._background(width, height, rng)
        self._paste(scene, garment, rng)
        return self._degrade(self._relight(scene, rng), rng)

    def _cut_out(self, shop: Image.Image, rng: random.Random) -> Image.Image:
        """The garment as RGBA: masked, cropped around the mask, randomly trimmed, tilted."""
        rgba = shop.copy()
        rgba.putalpha(garment_mask(shop))
        box = rgba.getchannel("A").point(lambda v: 255 if v > 32 else 0).getbbox()
        if box:
            rgba = rgba.crop(box)
        rgba = self._random_trim(rgba, rng)
        if self.perspective:
            # Transparent fill: the tilted frame's corners must not be pasted.
            rgba = random_perspective(rgba, self.perspective, (0, 0, 0, 0), rng)
        return rgba

    def _random_trim(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        keep_w = max(1, round(width * rng.uniform(*self.crop_scale) ** 0.5))
        keep_h = max(1, round(height * rng.uniform(*self.crop_scale) ** 0.5))
        left = rng.randint(0, width - keep_w)
        top = rng.randint(0, height - keep_h)
        return image.crop((left, top, left + keep_w, top + keep_h))

    def _background(self, width: int, height: int, rng: random.Random) -> Image.Image:
        path = rng.choice(self.backgrounds)
        photo = load_image(path, draft_size=max(width, height))
        # Cover the output: scale to fill, then a random crop of the right size.
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.4)
        photo = photo.resize(
            (max(width, round(photo.width * scale)), max(height, round(photo.height * scale))),
            Image.BILINEAR,
        )
        left = rng.randint(0, photo.width - width)
        top = rng.randint(0, photo.height - height)
        return photo.crop((left, top, left + width, top + height))

    def _paste(self, scene: Image.Image, garment: Image.Image, rng: random.Random) -> None:
        target_h = scene.height * rng.uniform(*self.garment_height)
        scale = min(target_h / garment.height, 0.95 * scene.width / garment.width)
        size = (max(1, round(garment.width * scale)), max(1, round(garment.height * scale)))
        garment = garment.resize(size, Image.BICUBIC)
        left = rng.randint(0, scene.width - garment.width)
        top = rng.randint(0, scene.height - garment.height)
        scene.paste(garment, (left, top), garment)

    def _relight(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """Gamma, brightness and a soft left-right light gradient; all channels alike."""
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array ** rng.uniform(*self.gamma)
        light = rng.uniform(*self.brightness)
        tilt = rng.uniform(-0.15, 0.15)
        gradient = light * (1 + tilt * np.linspace(-1, 1, image.width, dtype=np.float32))
        array = array * gradient[None, :, None]
        return Image.fromarray(np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8))

    def _degrade(self, image: Image.Image, rng: random.Random) -> Image.Image:
        if rng.random() < self.blur:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
        if rng.random() < 0.5:  # a cheap phone sensor: lose resolution, scale back up
            factor = rng.uniform(0.4, 0.9)
            small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            image = image.resize(small, Image.BILINEAR).resize(image.size, Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(*self.jpeg_quality))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


class SyntheticViews(Dataset):
    """``views`` samples per image, all labelled with the image's index.

    Sample ``j`` is view ``j % views`` of image ``j // views``. With ``include_original``
    view 0 is the photo itself; the other views are :class:`ConsumerStyle` syntheses. Every
    view then goes through ``transform`` (e.g. a training transform), giving
    ``(float32 CHW tensor, image index)``. ``labels`` lists the per-sample labels for
    :class:`~vestis.data.PKSampler`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        synthesis: ConsumerStyle,
        transform: ImageTransform,
        *,
        views: int = 2,
        include_original: bool = True,
        draft_size: int | None = None,
    ):
        if not paths:
            raise ValueError("SyntheticViews needs at least one image path")
        if views < 2:
            raise ValueError(f"views must be at least 2 to form positive pairs, got {views}")
        self.paths = [Path(p) for p in paths]
        self.synthesis = synthesis
        self.transform = transform
        self.views = views
        self.include_original = include_original
        self.draft_size = draft_size
        self.labels = [index for index in range(len(self.paths)) for _ in range(views)]
        self.label_names = [str(path) for path in self.paths]

    def __len__(self) -> int:
        return len(self.paths) * self.views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image_index, view = divmod(index, self.views)
        image = load_image(self.paths[image_index], draft_size=self.draft_size)
        if view > 0 or not self.include_original:
            image = self.synthesis(image)
        return to_tensor(self.transform(image)), image_index

    def reseed(self, seed: int) -> None:
        self.synthesis.reseed(seed)
        if hasattr(self.transform, "reseed"):
            self.transform.reseed(seed + 1)

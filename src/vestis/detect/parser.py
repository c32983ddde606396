"""The public parser API: ``load_parser()`` then ``parser.parse(image)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vestis.artifacts import artifacts
from vestis.defaults import DEFAULT_PARSER
from vestis.images import ImageSource, load_image

from .boxes import Box, BoxRules, regions_from_labels
from .groups import GROUP_COLOURS
from .landmarks import Landmarks, mask_landmarks
from .metrics import (
    ParsingMetrics,
    confusion,
    dataset_lookup,
    instance_metrics,
    load_group_mask,
    metrics_from_confusion,
    photo_instances,
    read_parsing_csv,
)
from .model import ParserNet, input_shape, load_parser_net, to_input
from .onnx import create_runner

#: Parsers shipped in the package, by name (from :data:`vestis.artifacts.ARTIFACTS`).
SHIPPED = {a.name: a.path for a in artifacts("parser")}
#: ``segment`` computes label maps at most this many pixels on the long side by default.
WORK_SIDE = 1024


@dataclass(frozen=True, eq=False)
class Garment:
    """One garment in a photo: its group, box (x1, y1, x2, y2 in the photo's pixels, x2/y2
    exclusive), score (mean probability of the group over its pixels) and boolean mask
    (the photo's size)."""

    group: str
    box: Box
    score: float
    mask: np.ndarray

    def to_dict(self) -> dict:
        return {"group": self.group, "box": list(self.box), "score": round(self.score, 4),
                "area": int(self.mask.sum())}

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def landmarks(self) -> Landmarks:
        """FashionNet's eight landmarks, read off the mask (see :mod:`.landmarks`)."""
        return mask_landmarks(self.mask, self.group)

    def crop(self, image: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
        """The garment's box cut from ``image`` (the parsed photo); with ``fill``, the pixels
        of the box outside the garment's mask (background, skin, other garments) are painted
        that colour."""
        x1, y1, x2, y2 = self.box
        crop = image.crop((x1, y1, x2, y2))
        if fill is None:
            return crop
        keep = Image.fromarray(self.mask[y1:y2, x1:x2].astype(np.uint8) * 255)
        return Image.composite(crop, Image.new("RGB", crop.size, fill), keep)


@dataclass(frozen=True, eq=False)
class Parsing:
    """A photo's parse: per-pixel group ``labels`` and ``probs`` at ``scale`` x the photo."""

    labels: np.ndarray
    probs: np.ndarray
    scale: float


class GarmentParser:
    def __init__(self, net: ParserNet, name: str = "", meta: dict | None = None,
                 rules: BoxRules = BoxRules(), backend: str = "auto", flip: bool = True):
        """``backend``: ``auto`` (ONNX Runtime when installed and its export agrees with
        torch), ``onnx`` or ``torch``. ``flip``: average the class probabilities of the
        photo and its mirror image (one batch of two; +0.013 held-out mIoU, README)."""
        self.net = net.eval()
        self.flip = flip
        self.name = name
        self.meta = meta or {}
        self.rules = rules
        self.groups = net.config.groups
        self.runner = create_runner(self.net, backend)

    @property
    def backend_name(self) -> str:
        return self.runner.name

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str | None = None,
                        backend: str = "auto", flip: bool = True) -> GarmentParser:
        net, meta = load_parser_net(path)
        return cls(net, name or Path(path).stem, meta, backend=backend, flip=flip)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """(w, h) of the network input's unpadded part for ``image``."""
        new_w, new_h, _, _ = input_shape(image.width, image.height, self.net.config.size)
        return new_w, new_h

    @torch.inference_mode()
    def logits(self, image: Image.Image) -> torch.Tensor:
        """Class logits at the size of the network input's unpadded part (1 x G x h x w)."""
        new_w, new_h, pad_w, pad_h = input_shape(image.width, image.height, self.net.config.size)
        x = to_input(image, (new_w, new_h), (pad_w, pad_h))
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        out = torch.from_numpy(self.runner(x.numpy()))
        if self.flip:  # log of the mean probability: a logit for softmax and argmax
            probs = out.softmax(1)
            out = ((probs[:1] + probs[1:].flip(-1)) / 2).clamp_min(1e-8).log()
        return _resized(out, (pad_w, pad_h))[:, :, :new_h, :new_w]

    @torch.inference_mode()
    def segment(self, image: ImageSource, size: tuple[int, int] | None = None) -> Parsing:
        """Per-pixel groups and probabilities at ``size`` (w, h); by default the photo's size,
        capped at :data:`WORK_SIDE` on the long side."""
        image = load_image(image)
        if size is None:
            scale = min(1.0, WORK_SIDE / max(image.size))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return _parsing(self.logits(image), size, image.width)

    def parse(self, image: ImageSource) -> list[Garment]:
        """The garments of a photo (path, bytes or PIL image), one per instance (the rules of
        :mod:`.boxes`: a group's fragments on one person are one garment).

        Regions are found at the network input's resolution (the parser's ``size`` on the
        long side); boxes and masks are then scaled to the photo."""
        image = load_image(image)
        return self.garments(self.segment(image, size=self.input_size(image)), image)

    def garments(self, parsing: Parsing, image: Image.Image) -> list[Garment]:
        """The garment instances of ``parsing``, a parse of ``image``, in the photo's pixels."""
        regions = regions_from_labels(parsing.labels, parsing.probs, groups=self.groups,
                                      rules=self.rules)
        garments = []
        for region in regions:
            box, mask = region.box, region.mask
            if parsing.scale != 1.0:
                box = _scale_box(box, 1.0 / parsing.scale, image.size)
                mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
            garments.append(Garment(region.group, box, region.score, mask))
        return garments

    def evaluate(self, dataset: str | Path, labels: str | Path | None = None,
                 progress: bool = False) -> ParsingMetrics:
        """Parsing metrics on a CCP-format CSV, at each mask's own resolution."""
        return self.evaluate_rows(read_parsing_csv(dataset), dataset_lookup(dataset, labels),
                                  progress)

    def evaluate_rows(self, rows, lookup: np.ndarray, progress: bool = False) -> ParsingMetrics:
        """Parsing metrics over rows with ``image`` and ``mask`` paths; ``lookup`` maps mask
        values to group indices (:func:`vestis.detect.groups.label_lookup`). One network pass
        per photo gives both the per-pixel labels at the mask's resolution (IoU) and the
        garments :meth:`parse` would return (instance metrics)."""
        from tqdm.auto import tqdm

        matrix = np.zeros((len(self.groups),) * 2, dtype=np.int64)
        photos = []
        for row in tqdm(rows, desc="eval-parsing", unit="photo", disable=not progress):
            truth = load_group_mask(row.mask, lookup)
            image = load_image(row.image)
            if image.size != (truth.shape[1], truth.shape[0]):
                raise ValueError(f"{row.mask}: mask size {truth.shape[::-1]} differs from "
                                 f"the photo's {image.size}")
            with torch.inference_mode():
                logits = self.logits(image)
            pred = _parsing(logits, image.size, image.width).labels
            matrix += confusion(pred, truth, len(self.groups))
            found = self.garments(_parsing(logits, self.input_size(image), image.width), image)
            photos.append(photo_instances(found, truth, self.groups))
        metrics = metrics_from_confusion(matrix, self.groups, images=len(rows))
        metrics.instances = instance_metrics(photos)
        return metrics


def _parsing(logits: torch.Tensor, size: tuple[int, int], photo_width: int) -> Parsing:
    """Labels and probabilities of class ``logits`` (1 x G x h x w) resized to ``size``."""
    probs = _resized(logits, size).softmax(1)[0]
    labels = probs.max(0).indices.to(torch.uint8)  # argmax's first maximum, several times faster
    return Parsing(labels.numpy(), probs.numpy(), size[0] / photo_width)


def _resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``maps`` (N x C x h x w) resized bilinearly to ``size`` (w, h); as they are when they
    already have that size (where bilinear resizing is the identity)."""
    if tuple(maps.shape[-2:]) == (size[1], size[0]):
        return maps
    return F.interpolate(maps, size=(size[1], size[0]), mode="bilinear", align_corners=False)


def _scale_box(box: Box, factor: float, size: tuple[int, int]) -> Box:
    x1, y1, x2, y2 = box
    return (max(0, int(x1 * factor)), max(0, int(y1 * factor)),
            min(size[0], int(np.ceil(x2 * factor))), min(size[1], int(np.ceil(y2 * factor))))


def load_parser(name: str | Path = DEFAULT_PARSER, backend: str = "auto",
                flip: bool = True) -> GarmentParser:
    """A shipped parser by name (``parser-lite0``), or a checkpoint path written by training.

    ``backend`` (``auto``, ``onnx`` or ``torch``) and ``flip``: see :class:`GarmentParser`."""
    key = str(name)
    if key in SHIPPED:
        if not SHIPPED[key].is_file():
            raise FileNotFoundError(f"the weights of parser {key!r} are missing: {SHIPPED[key]}")
        return GarmentParser.from_checkpoint(SHIPPED[key], key, backend, flip)
    path = Path(key).expanduser()
    if path.is_file():
        return GarmentParser.from_checkpoint(path, backend=backend, flip=flip)
    raise ValueError(f"unknown parser {key!r}: not one of {', '.join(SHIPPED)} and not a "
                     "checkpoint file")


def draw_garments(image: ImageSource, garments: list[Garment], alpha: float = 0.45,
                  landmarks: bool = False) -> Image.Image:
    """The photo with each garment's mask tinted in its group's colour and its box outlined;
    with ``landmarks``, each garment's visible landmarks as white dots."""
    photo = load_image(image)
    base = np.asarray(photo, dtype=np.float32)
    tint = base.copy()
    for garment in garments:
        tint[garment.mask] = GROUP_COLOURS.get(garment.group, (255, 255, 255))
    blended = Image.fromarray((base * (1 - alpha) + tint * alpha).astype(np.uint8))
    draw = ImageDraw.Draw(blended)
    line = max(2, round(max(photo.size) / 300))
    for garment in garments:
        colour = GROUP_COLOURS.get(garment.group, (255, 255, 255))
        x1, y1, x2, y2 = garment.box
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=line)
        text = f"{garment.group} {garment.score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 4 if y1 >= (bottom - top) + 4 else y1
        draw.rectangle((x1, ty, x1 + right - left + 4, ty + bottom - top + 4), fill=colour)
        draw.text((x1 + 2, ty + 1), text, fill=(0, 0, 0))
        if landmarks:
            found = garment.landmarks()
            for (x, y), seen in zip(found.points, found.visible, strict=True):
                if seen:
                    draw.ellipse((x - 2 * line, y - 2 * line, x + 2 * line, y + 2 * line),
                                 fill=(255, 255, 255), outline=colour, width=line)
    return blended

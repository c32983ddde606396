"""Attribute and category prediction (FashionNet's attribute branch, on our backbone).

Two heads read the pooled features of the frozen ImageNet EfficientNet-Lite0 (``lite0``): a
multi-label attribute head trained with BCE (one sigmoid per attribute value: material,
pattern, climate, style...) and a category head trained with cross-entropy. The retrieval
model's embedding is not used: instance training keeps what tells two items apart and drops
much of what they share, such as the material (``BENCHMARKS.md``, "Attributes").

>>> model = load_attribute_model()                    # the shipped heads
>>> model.describe("photo.jpg").to_dict()
{'category': {...}, 'attributes': {'pattern': [['Solid', 0.93]], ...}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vestis.artifacts import ARTIFACTS, artifacts
from vestis.defaults import DEFAULT_ATTRIBUTE_MODEL
from vestis.images import ImageError, ImageSource, describe_source, load_image

#: The model whose pooled features the heads of this module (and Comp-Net) read.
FEATURE_MODEL = "lite0"
#: Families whose predicted top value is stored as ``predicted.<family>`` catalog metadata.
PREDICTED_PREFIX = "predicted."
#: The smallest side, in pixels, of a photo the attribute heads will describe.
MIN_DESCRIBE_SIDE = 32


class LabelSpace:
    """Ordered attribute values grouped in families (a products.csv column each)."""

    def __init__(self, families: Mapping[str, Sequence[str]]):
        self.families = {name: list(values) for name, values in families.items() if values}
        if not self.families:
            raise ValueError("a label space needs at least one family with values")
        self.labels = [(family, value) for family, values in self.families.items()
                       for value in values]
        self._index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_products(cls, products: Mapping[str, Any], columns: Sequence[str],
                      min_count: int = 1) -> LabelSpace:
        """Values seen at least ``min_count`` times in ``products`` (``Product`` objects)."""
        families = {}
        for column in columns:
            counts: dict[str, int] = {}
            for product in products.values():
                for value in product.values(column):
                    counts[value] = counts.get(value, 0) + 1
            families[column] = sorted(v for v, n in counts.items() if n >= min_count)
        return cls(families)

    def __len__(self) -> int:
        return len(self.labels)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for family, values in self.families.items():
            out[family] = slice(start, start + len(values))
            start += len(values)
        return out

    def encode(self, values: Mapping[str, Sequence[str]]) -> np.ndarray:
        """A multi-hot row for ``{family: [values]}``; unknown values are ignored."""
        row = np.zeros(len(self.labels), dtype=np.float32)
        for family, chosen in values.items():
            for value in chosen:
                index = self._index.get((family, value))
                if index is not None:
                    row[index] = 1.0
        return row

    def to_dict(self) -> dict[str, list[str]]:
        return {family: list(values) for family, values in self.families.items()}


class AttributeHead(nn.Module):
    """Standardise the features, then one linear layer per task (as FashionNet's branches)."""

    def __init__(self, in_dim: int, num_attributes: int, num_categories: int,
                 dropout: float = 0.3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.dropout = nn.Dropout(dropout)
        self.attributes = nn.Linear(in_dim, num_attributes)
        self.categories = nn.Linear(in_dim, num_categories) if num_categories else None

    def set_statistics(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.dropout((features - self.mean) / self.std)
        categories = self.categories(x) if self.categories is not None else None
        return self.attributes(x), categories


@dataclass
class Description:
    """What the heads see in one image: the category and each family's likely values."""

    category: str | None
    category_probability: float
    attributes: dict[str, list[tuple[str, float]]]

    def top(self, family: str) -> str | None:
        values = self.attributes.get(family) or []
        return values[0][0] if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": {"name": self.category,
                         "probability": round(self.category_probability, 4)},
            "attributes": {family: [[value, round(p, 4)] for value, p in values]
                           for family, values in self.attributes.items()},
        }

    def as_metadata(self) -> dict[str, str]:
        """``predicted.<family>`` = the most likely value (and ``predicted.category``),
        stored on catalog items and usable as ``--where`` filters."""
        meta = {f"{PREDICTED_PREFIX}{family}": values[0][0]
                for family, values in self.attributes.items() if values}
        if self.category:
            meta[f"{PREDICTED_PREFIX}category"] = self.category
        return meta


class AttributeModel:
    """Feature extractor (``lite0``) + :class:`AttributeHead`, with the label names."""

    def __init__(self, head: AttributeHead, labels: LabelSpace, categories: Sequence[str],
                 feature_model: str = FEATURE_MODEL, meta: dict | None = None,
                 prior: np.ndarray | None = None):
        self.head = head.eval()
        #: Each value's frequency among the training images: the label-frequency baseline.
        self.prior = (np.asarray(prior, dtype=np.float32) if prior is not None
                      else np.full(len(labels), 0.5, dtype=np.float32))
        self.labels = labels
        self.categories = list(categories)
        self.feature_model = feature_model
        self.meta = meta or {}
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from vestis.models.encoder import Encoder

            self._encoder = Encoder.from_name(self.feature_model)
        return self._encoder

    def features(self, images: Sequence[ImageSource], progress: bool = False) -> np.ndarray:
        return self.encoder.embed(list(images), progress=progress)

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(attribute probabilities (N, A) by sigmoid, category probabilities (N, C))."""
        attributes, categories = self.head(torch.as_tensor(features, dtype=torch.float32))
        category_p = categories.softmax(1).numpy() if categories is not None else None
        return attributes.sigmoid().numpy(), category_p

    def describe_features(self, features: np.ndarray, threshold: float = 0.5,
                          top: int = 3) -> list[Description]:
        attribute_p, category_p = self.probabilities(features)
        return [self._describe_row(attribute_p[i], None if category_p is None else category_p[i],
                                   threshold, top) for i in range(len(features))]

    def describe(self, image: ImageSource, threshold: float = 0.5, top: int = 3) -> Description:
        """The category and, per family, the values at least ``threshold`` likely (at most
        ``top``, most likely first); a family with none is left out. A photo under
        :data:`MIN_DESCRIBE_SIDE` pixels on a side is refused (ImageError): the heads would
        still name a category, confidently, from a few pixels."""
        photo = load_image(image)
        if min(photo.size) < MIN_DESCRIBE_SIDE:
            raise ImageError(describe_source(image), f"{photo.width}x{photo.height} pixels is "
                             f"too small to describe (at least {MIN_DESCRIBE_SIDE}x"
                             f"{MIN_DESCRIBE_SIDE} is needed)")
        return self.describe_features(self.features([photo]), threshold, top)[0]

    def _describe_row(self, attribute_p, category_p, threshold, top) -> Description:
        families = {}
        for family, part in self.labels.slices().items():
            values = self.labels.families[family]
            order = np.argsort(-attribute_p[part])
            chosen = [(values[i], float(attribute_p[part][i])) for i in order[:top]
                      if attribute_p[part][i] >= threshold]
            if chosen:
                families[family] = chosen
        if category_p is None:
            return Description(None, 0.0, families)
        best = int(np.argmax(category_p))
        return Description(self.categories[best], float(category_p[best]), families)

    def save(self, path: str | Path) -> Path:
        return save_head(path, "vestis-attributes", self.head, labels=self.labels,
                         feature_model=self.feature_model, meta=self.meta,
                         categories=self.categories,
                         prior=torch.as_tensor(self.prior).half())

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> AttributeModel:
        blob, state, labels = read_head(path, "vestis-attributes", "attribute-head")
        head = AttributeHead(state["mean"].numel(), len(labels), len(blob["categories"]))
        head.load_state_dict(state)
        prior = blob.get("prior")
        return cls(head, labels, blob["categories"], blob["feature_model"], blob.get("meta"),
                   None if prior is None else prior.float().numpy())


def save_head(path: str | Path, kind: str, module: nn.Module, *, labels: LabelSpace,
              feature_model: str, meta: dict, **fields: Any) -> Path:
    """A small head as shipped: its weights in fp16, its label names and feature model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    torch.save({"format": kind, "version": 1, "state_dict": state, "labels": labels.to_dict(),
                "feature_model": feature_model, "meta": meta, **fields}, path)
    return path


def read_head(path: str | Path, kind: str, what: str) -> tuple[dict, dict, LabelSpace]:
    """(the whole checkpoint, its weights in float32, its label space)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != kind:
        raise ValueError(f"{path} is not a vestis {what} checkpoint")
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    return blob, state, LabelSpace(blob["labels"])


def resolve_head_path(name: str | Path, kind: str) -> Path:
    """A shipped head by name (an artifact of ``kind``, ``attributes`` or ``outfits``, in
    :data:`vestis.artifacts.ARTIFACTS`) or a path to a checkpoint."""
    path = Path(name)
    if path.suffix == ".pt" and path.is_file():
        return path
    shipped = ARTIFACTS.get(str(name))
    if shipped is not None and shipped.kind == kind and shipped.exists():
        return shipped.path
    known = sorted(a.name for a in artifacts(kind) if a.exists())
    raise ValueError(f"unknown {kind.removesuffix('s')} model {str(name)!r}: not a file, nor "
                     f"one of {', '.join(known)}")


def load_attribute_model(name: str | Path = DEFAULT_ATTRIBUTE_MODEL) -> AttributeModel:
    return AttributeModel.from_checkpoint(resolve_head_path(name, "attributes"))

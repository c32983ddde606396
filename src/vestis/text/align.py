"""A learned map from sentence vectors (MiniLM, 384-d) into a catalog model's image space.

Locked-image, locked-text tuning: both encoders stay frozen; only a small head is trained,
with a symmetric InfoNCE over (image vector, text vector) pairs of the catalog's own
training products. Each item's texts name its colour (:func:`item_variants`); pairs that
share an item or the very same text (two black hoodies for "black hoodie") are both
positives. The head is saved in fp16 with the id of the image model it maps into, and
refuses a catalog of any other model.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vestis.artifacts import artifacts
from vestis.catalog.catalog import ModelMismatchError
from vestis.data.products import Product, product_split, products_of, read_products
from vestis.text.encoder import TEXT_MODEL_ID, embed_texts
from vestis.text.texts import item_variants

FORMAT = "vestis-text-align/1"


class AlignmentHead(nn.Module):
    """Text vector → unit vector in the image space: linear, or a residual MLP on top of it."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int = 0):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "kind": kind, "hidden": hidden}
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim)) if kind == "mlp" else None
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        out = self.linear(text)
        if self.mlp is not None:
            out = out + self.mlp(text)
        return nn.functional.normalize(out, dim=-1)


def info_nce(text: torch.Tensor, image: torch.Tensor, positives: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of unit ``text`` and ``image`` rows; ``positives[i, j]`` marks the
    pairs that match (the diagonal at least). Several positives share the target mass."""
    logits = scale * text @ image.T
    target = positives.float()
    t2i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    i2t = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (t2i + i2t) / 2


@dataclass
class TextAlignment:
    """A trained head and the image model it belongs to."""

    head: AlignmentHead
    model_id: str
    text_model_id: str = TEXT_MODEL_ID
    info: dict[str, Any] = field(default_factory=dict)

    def project(self, text_vectors: np.ndarray) -> np.ndarray:
        """(n, 384) sentence vectors → (n, image dim) unit vectors, float32."""
        with torch.inference_mode():
            rows = torch.as_tensor(np.atleast_2d(text_vectors), dtype=torch.float32)
            return self.head(rows).numpy()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → image-space query vectors."""
        return self.project(embed_texts(texts))

    def check(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"this text-alignment head maps into model {self.model_id!r}; it cannot "
                f"search a catalog of model {model_id!r}. Train one for that model: "
                "vestis.text.train_alignment(...)")

    def save(self, path: str | Path) -> Path:
        """fp16 weights plus the model ids, in one small torch file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {key: value.half() for key, value in self.head.state_dict().items()}
        torch.save({"format": FORMAT, "model_id": self.model_id,
                    "text_model_id": self.text_model_id, "config": self.head.config,
                    "state_dict": state, "info": self.info}, path)
        return path


def load_alignment(path: str | Path, model_id: str | None = None) -> TextAlignment:
    """A saved head; with ``model_id``, refuses one trained for another image model."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vestis text-alignment head")
    if blob["text_model_id"] != TEXT_MODEL_ID:
        raise ValueError(f"{path}: trained on text model {blob['text_model_id']!r}, "
                         f"not {TEXT_MODEL_ID!r}")
    head = AlignmentHead(**blob["config"])
    head.load_state_dict({key: value.float() for key, value in blob["state_dict"].items()})
    alignment = TextAlignment(head.eval(), blob["model_id"], blob["text_model_id"],
                              blob.get("info", {}))
    if model_id is not None:
        alignment.check(model_id)
    return alignment


_SHIPPED: dict[str, TextAlignment] = {}


def alignment_for(model_id: str, weights_dir: str | Path | None = None) -> TextAlignment:
    """The shipped head for an image model id (cached); a clear error when there is none.

    Shipped heads are the ``text`` artifacts of :data:`vestis.artifacts.ARTIFACTS`;
    ``weights_dir`` looks among the ``text-align-*.pt`` files of a folder instead."""
    if model_id not in _SHIPPED:
        for path in _head_files(weights_dir):
            head = load_alignment(path)
            if head.model_id == model_id:
                _SHIPPED[model_id] = head
                break
        else:
            raise ModelMismatchError(
                f"no text-alignment head for model {model_id!r} in "
                f"{weights_dir or 'the shipped artifacts'}; text search by embedding needs "
                "one (vestis train configs/text_align.yaml, then vestis ship), or use "
                "mode='bm25'")
    return _SHIPPED[model_id]


def _head_files(weights_dir: str | Path | None) -> list[Path]:
    if weights_dir is not None:
        return sorted(Path(weights_dir).glob("text-align-*.pt"))
    return [a.path for a in artifacts("text") if a.exists()]


# -- training data ---------------------------------------------------------------------
@dataclass
class PairSet:
    """Items with their image vectors and text vectors (one per template)."""

    item_ids: list[str]
    images: list[np.ndarray]                 # per item: (views, image dim)
    texts: list[list[str]]                   # per item: its texts
    text_vectors: list[np.ndarray]           # per item: (texts, 384)


def read_rows(catalog_csv: str | Path) -> list[dict[str, str]]:
    """Catalog rows with absolute image paths."""
    catalog_csv = Path(catalog_csv).resolve()
    with catalog_csv.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["image"] = str((catalog_csv.parent / row["image"]).resolve())
    return rows


def image_vectors(paths: Sequence[str], encoder, cache: str | Path | None = None) -> np.ndarray:
    """Image vectors of ``paths`` from ``encoder``, kept in an ``.npz`` cache by model id."""
    file = Path(cache) / f"images-{encoder.model_id.replace('/', '_')}.npz" if cache else None
    known: dict[str, np.ndarray] = {}
    if file is not None and file.exists():
        with np.load(file) as data:
            known = dict(zip(data["paths"].tolist(), data["vectors"], strict=True))
    todo = [p for p in dict.fromkeys(paths) if p not in known]
    if todo:
        known.update(zip(todo, encoder.embed(todo), strict=True))
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(file, paths=np.array(list(known)), vectors=np.stack(list(known.values())))
    return np.stack([known[p] for p in paths]).astype(np.float32)


def build_pairs(rows: Sequence[Mapping[str, str]], vectors: np.ndarray,
                products: Mapping[str, Product] | None,
                templates: Sequence[str] | None = None) -> PairSet:
    """Group image rows by item; texts from :func:`item_variants` (``templates`` keeps some)."""
    by_item: dict[str, list[int]] = {}
    for n, row in enumerate(rows):
        by_item.setdefault(row["item_id"], []).append(n)
    ids, images, texts = [], [], []
    for item_id, positions in by_item.items():
        variants = item_variants(rows[positions[0]], products)
        chosen = [t for key, t in variants.items() if templates is None or key in templates]
        ids.append(item_id)
        images.append(vectors[positions])
        texts.append(chosen)
    flat = embed_texts([t for item in texts for t in item])
    splits = np.cumsum([len(item) for item in texts])[:-1]
    return PairSet(ids, images, texts, np.split(flat, splits))


# -- training --------------------------------------------------------------------------
def _batch(pairs: PairSet, rng: np.random.Generator):
    """One image and one text per item; positives: same item or same text."""
    image = np.stack([views[rng.integers(len(views))] for views in pairs.images])
    picks = [rng.integers(len(t)) for t in pairs.texts]
    text = np.stack([vecs[p] for vecs, p in zip(pairs.text_vectors, picks, strict=True)])
    strings = np.array([t[p] for t, p in zip(pairs.texts, picks, strict=True)])
    positives = (strings[:, None] == strings[None, :]) | np.eye(len(strings), dtype=bool)
    return torch.from_numpy(text), torch.from_numpy(image), torch.from_numpy(positives)


def pair_loss(head: AlignmentHead, pairs: PairSet, seed: int = 0, draws: int = 8) -> float:
    """Mean InfoNCE over ``draws`` fixed random batches of ``pairs``."""
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        losses = [info_nce(head(t), i, p, head.logit_scale.exp().clamp(max=100))
                  for t, i, p in (_batch(pairs, rng) for _ in range(draws))]
    return float(torch.stack(losses).mean())


def fit_head(pairs: PairSet, *, kind: str = "linear", hidden: int = 0, steps: int = 400,
             lr: float = 2e-3, weight_decay: float = 0.05, seed: int = 0) -> AlignmentHead:
    """Train a head on ``pairs``: full-batch AdamW steps (all items in every batch). One
    torch thread: the matrices are small, and more threads only contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(pairs, kind, hidden, steps, lr, weight_decay, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(pairs: PairSet, kind: str, hidden: int, steps: int, lr: float, weight_decay: float,
         seed: int) -> AlignmentHead:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = AlignmentHead(pairs.text_vectors[0].shape[1], pairs.images[0].shape[1], kind, hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        text, image, positives = _batch(pairs, rng)
        loss = info_nce(head(text), image, positives, head.logit_scale.exp().clamp(max=100))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return head.eval()


def train_alignment(
    catalog_csv: str | Path,
    products_csv: str | Path | None,
    out: str | Path | None,
    *,
    model: str = "vestis-lite0",
    kind: str = "linear",
    hidden: int = 0,
    steps: int = 400,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    templates: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    cache: str | Path | None = None,
    encoder=None,
) -> TextAlignment:
    """Train the text→image head on the training products of a Luma-layout catalog (the
    split of :func:`product_split`, so the default model's held-out products stay unseen),
    and save it to ``out`` (fp16) when given. ``cache``: a folder for image vectors."""
    from vestis.models import Encoder

    started = time.perf_counter()
    encoder = encoder or Encoder.from_name(model)
    train, _ = product_split(catalog_csv, val_fraction=val_fraction)
    keep = products_of(train)
    rows = [row for row in read_rows(catalog_csv) if row["product"] in keep]
    products = read_products(products_csv) if products_csv else None
    vectors = image_vectors([row["image"] for row in rows], encoder, cache)
    pairs = build_pairs(rows, vectors, products, templates)
    head = AlignmentHead(pairs.text_vectors[0].shape[1], vectors.shape[1], kind, hidden)
    before = pair_loss(head, pairs)
    head = fit_head(pairs, kind=kind, hidden=hidden, steps=steps, lr=lr,
                    weight_decay=weight_decay, seed=seed)
    info = {"items": len(pairs.item_ids), "products": len(keep), "images": len(rows),
            "loss_before": round(before, 4), "loss_after": round(pair_loss(head, pairs), 4),
            "steps": steps, "lr": lr, "weight_decay": weight_decay, "seed": seed,
            "templates": list(templates) if templates else "all",
            "seconds": round(time.perf_counter() - started, 1)}
    alignment = TextAlignment(head, encoder.model_id, info=info)
    if out is not None:
        alignment.save(out)
    return alignment


#: Every key a text-alignment recipe may set, with its default (anything else is refused).
RECIPE_DEFAULTS: dict[str, Any] = {
    "task": "text", "catalog": None, "products": None, "cache": None, "model": "vestis-lite0",
    "kind": "linear", "hidden": 0, "steps": 400, "lr": 2e-3, "weight_decay": 0.05,
    "templates": None, "seed": 0, "val_fraction": 0.2,
}
#: The head's file in a run folder (``vestis ship RUN text-align-lite0`` stores it).
RUN_FILE = "text-align.pt"


def train_from_recipe(path: str | Path, out: str | Path,
                      root: str | Path | None = None) -> TextAlignment:
    """:func:`train_alignment` with the settings of a YAML recipe (``configs/text_align.yaml``),
    saved to ``out/text-align.pt``; relative paths are relative to ``root`` (default: the
    current directory). An unknown key or a missing ``catalog`` is refused before any work."""
    from vestis.recipe_files import read_recipe, refuse_unknown_keys, require_paths

    recipe = dict(read_recipe(path))
    refuse_unknown_keys(recipe, RECIPE_DEFAULTS)
    recipe = {**RECIPE_DEFAULTS, **recipe}
    require_paths(recipe, ("catalog",), "recipe")
    recipe.pop("task")
    root = Path(root or ".")
    paths = {key: root / recipe.pop(key) if recipe.get(key) else recipe.pop(key)
             for key in ("catalog", "products", "cache")}
    Path(out).mkdir(parents=True, exist_ok=True)
    return train_alignment(paths["catalog"], paths["products"], Path(out) / RUN_FILE,
                           cache=paths["cache"], **recipe)


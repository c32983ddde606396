"""Training the learned re-ranker (:class:`vestis.models.matcher.MatchHead`):
``vestis train configs/rerank.yaml``.

Pairs come from the *training* split of a retrieval recipe (``base_recipe``, by default the
shipped model's ``configs/vestis-lite0.yaml``, same seed and split: its held-out products
stay unseen). Every training image of the source (``source``, Luma: several views per item)
is embedded by the base model as it is, in ``augmented_views`` augmented copies (the base
recipe's augmentation) and in ``synthetic_views`` consumer-style copies
(:class:`vestis.data.synthesis.ConsumerStyle` on real street backgrounds). Each view is a
query against the plain vectors of the other images, as a catalog stores them; its
candidates are the base model's own top ``top_k`` (the hard negatives: other colours of the
product, look-alikes), positives the other images of its item. The head learns a listwise
softmax over each query's candidates.

A fifth of the training products (``check_fraction``) is held back first to choose the
epoch count and report the check figures; then the head is refitted on every product for
that many epochs and saved (fp16) to ``RUN/matcher.pt``; ``vestis ship RUN rerank-lite0``
stores it. The embeddings are cached (``cache``), so a refit costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vestis.atomic import atomic_path
from vestis.models.matcher import MatchHead, save_matcher

#: Every key a rerank recipe may set, with its default (anything else is refused).
RECIPE_DEFAULTS: dict[str, Any] = {
    "task": "rerank", "base_recipe": None, "source": "luma", "model": "vestis-lite0",
    "augmented_views": 2, "synthetic_views": 2, "backgrounds": None, "top_k": 50,
    "hidden": 64, "dropout": 0.1, "epochs": 40, "lr": 0.002, "weight_decay": 0.01,
    "batch_size": 64, "check_fraction": 0.2, "seed": 0, "cache": None,
}
#: The head's file in a run folder (``vestis ship RUN rerank-lite0`` stores it).
RUN_FILE = "matcher.pt"


@dataclass
class PairData:
    """Cached base-model vectors: ``views`` (N, V, D), view 0 the plain photo; one item
    label and one product per image."""

    views: torch.Tensor
    items: list[str]
    products: list[str]

    def subset(self, rows: list[int]) -> PairData:
        return PairData(self.views[rows], [self.items[i] for i in rows],
                        [self.products[i] for i in rows])


def train_from_recipe(path: str | Path, out: str | Path, overrides: dict | None = None,
                      *, progress: bool = True) -> str:
    """Train the head with the settings of a YAML recipe into ``out/matcher.pt``; returns a
    summary line. An unknown key or a missing ``base_recipe`` is refused before any work."""
    from vestis.recipe_files import read_recipe, refuse_unknown_keys, require_paths
    from vestis.train.config import resolve_path

    path = Path(path)
    recipe = {**read_recipe(path), **(overrides or {})}
    refuse_unknown_keys(recipe, RECIPE_DEFAULTS)
    recipe = {**RECIPE_DEFAULTS, **recipe}
    require_paths(recipe, ("base_recipe",), "recipe")
    written = {key: value for key, value in recipe.items() if key != "task"}  # for the meta
    base_dir = path.resolve().parent
    recipe["base_recipe"] = str(resolve_path(recipe["base_recipe"], base_dir))
    if recipe["synthetic_views"] and recipe["backgrounds"]:
        recipe["backgrounds"] = str(resolve_path(recipe["backgrounds"], base_dir))
    elif recipe["synthetic_views"]:
        raise ValueError("synthetic_views needs backgrounds (a folder of photos, e.g. "
                         "../shared/data/ccp/photos)")
    data = pair_data(recipe, progress=progress)
    summary = fit_and_save(data, recipe, Path(out) / RUN_FILE, progress=progress,
                           written=written)
    return summary


def training_samples(recipe: dict) -> list:
    """The base recipe's training samples of ``source`` (its split, its seed)."""
    from vestis.train.config import load_config
    from vestis.train.sources import build_sources

    train, _ = build_sources(load_config(recipe["base_recipe"]))
    prefix = f"{recipe['source']}:"
    samples = [s for s in train if s.item_id.startswith(prefix)]
    if not samples:
        raise ValueError(f"{recipe['base_recipe']} has no training source {recipe['source']!r}")
    return samples


def pair_data(recipe: dict, *, progress: bool = True) -> PairData:
    """The base model's vectors of every training image and its views (cached)."""
    from vestis.models import Encoder

    samples = training_samples(recipe)
    encoder = Encoder.from_name(recipe["model"])
    keys = {"paths": [str(s.path) for s in samples], "model_id": encoder.model_id,
            **{k: recipe[k] for k in ("augmented_views", "synthetic_views", "backgrounds",
                                      "seed", "base_recipe")}, "version": 1}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(recipe["cache"]).expanduser() / f"{digest}.pt" if recipe["cache"] else None
    items = [s.item_id for s in samples]
    products = [s.group or s.item_id for s in samples]
    if cache is not None and cache.is_file():
        return PairData(torch.load(cache, weights_only=True)["views"], items, products)
    views = embed_views(encoder, [s.path for s in samples], recipe, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            torch.save({"views": views, "keys": keys}, tmp)
    return PairData(views, items, products)


def embed_views(encoder, paths: list[Path], recipe: dict, *, progress: bool = True
                ) -> torch.Tensor:
    """(N, 1 + augmented + synthetic, D) vectors: the plain photo, then its views."""
    from vestis.data.synthesis import ConsumerStyle, list_backgrounds
    from vestis.data.transforms import build_train_transform
    from vestis.images import load_image
    from vestis.train.config import load_config

    seed = recipe["seed"]
    augment = build_train_transform(load_config(recipe["base_recipe"])["augment"],
                                    encoder.preprocess, seed=seed)
    synthesis = (ConsumerStyle(list_backgrounds(recipe["backgrounds"]), rng=seed)
                 if recipe["synthetic_views"] else None)
    rows = []
    for path in tqdm(paths, desc="embedding views", unit="img", disable=not progress):
        photo = load_image(path)
        images = [photo]
        images += [augment.augment(photo) for _ in range(recipe["augmented_views"])]
        images += [synthesis(photo) for _ in range(recipe["synthetic_views"])]
        rows.append(torch.from_numpy(encoder.embed(images)))
    return torch.stack(rows)


# -- candidates and the listwise loss -----------------------------------------------------
@dataclass
class Lists:
    """Per query view: its vector, its top-k candidates' vectors and which are positives."""

    queries: torch.Tensor  # (Q, D)
    candidates: torch.Tensor  # (Q, K, D)
    positive: torch.Tensor  # (Q, K) bool
    view: torch.Tensor  # (Q,) the view index (0: the plain photo)


def candidate_lists(data: PairData, top_k: int) -> Lists:
    """Every view of every image whose item has another image, against the plain vectors of
    the *other* images (leave-one-out, as ``vestis eval`` ranks); its top ``top_k``."""
    gallery = data.views[:, 0]
    n, v, _ = data.views.shape
    items = np.asarray(data.items)
    same = torch.from_numpy(items[:, None] == items[None, :])
    has_pair = (same.sum(1) > 1).numpy()
    rows = np.flatnonzero(has_pair)
    queries = data.views[rows].reshape(len(rows) * v, -1)
    image = np.repeat(rows, v)
    sims = queries @ gallery.T
    sims[torch.arange(len(image)), torch.from_numpy(image)] = -float("inf")
    k = min(top_k, n - 1)
    top = sims.topk(k, dim=1).indices
    positive = same[torch.from_numpy(image)[:, None], top]
    view = torch.arange(v).repeat(len(rows))
    return Lists(queries, gallery[top], positive, view)


def listwise_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``-log P(a positive)`` under a softmax over each list's candidates (lists with a
    positive only)."""
    pos = logits.masked_fill(~positive, -float("inf")).logsumexp(1)
    return (logits.logsumexp(1) - pos).mean()


def fit(lists: Lists, recipe: dict, epochs: int, *, check: Lists | None = None,
        ) -> tuple[MatchHead, list[dict]]:
    """Train a head on ``lists``; with ``check``, its figures after every epoch."""
    torch.manual_seed(recipe["seed"])
    keep = lists.positive.any(1)
    queries, candidates, positive = (lists.queries[keep], lists.candidates[keep],
                                     lists.positive[keep])
    head = MatchHead(queries.shape[1], recipe["hidden"], recipe["dropout"])
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe["lr"],
                                  weight_decay=recipe["weight_decay"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    history = []
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(queries), generator=generator)
        for start in range(0, len(order), recipe["batch_size"]):
            batch = order[start:start + recipe["batch_size"]]
            loss = listwise_loss(head(queries[batch], candidates[batch]), positive[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if check is not None:
            history.append(list_figures(head, check))
    return head.eval(), history


def list_figures(head: MatchHead | None, lists: Lists) -> dict[str, float]:
    """R@1 within the lists (all views, plain photos, consumer-style views) and the mean
    reciprocal rank of the first positive; ``head`` None: the base model's order."""
    if head is None:
        logits = (lists.queries[:, None, :] * lists.candidates).sum(-1)
    else:
        head.eval()
        with torch.no_grad():
            logits = head(lists.queries, lists.candidates)
    order = logits.argsort(dim=1, descending=True, stable=True)
    hits = lists.positive.gather(1, order).float()
    found = hits.any(1)
    first = hits.argmax(1).float() + 1
    rr = torch.where(found, 1 / first, torch.zeros_like(first))
    top1 = hits[:, 0]
    return {"R@1": float(top1.mean()), "MRR": float(rr.mean()),
            "R@1 plain": float(top1[lists.view == 0].mean()),
            "R@1 views": float(top1[lists.view > 0].mean()), "lists": len(top1)}


def split_products(data: PairData, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    products = sorted(set(data.products))
    random.Random(seed).shuffle(products)
    held = set(products[:max(1, round(len(products) * fraction))])
    fit_rows = [i for i, p in enumerate(data.products) if p not in held]
    check_rows = [i for i, p in enumerate(data.products) if p in held]
    return fit_rows, check_rows


def fit_and_save(data: PairData, recipe: dict, out: Path, *, progress: bool = True,
                 written: dict | None = None) -> str:
    """Choose the epoch count on held-back training products, refit on all, save (with
    ``written``, the recipe as written, in its metadata)."""
    started = time.perf_counter()
    fit_rows, check_rows = split_products(data, recipe["check_fraction"], recipe["seed"])
    fit_lists = candidate_lists(data.subset(fit_rows), recipe["top_k"])
    check_lists = candidate_lists(data.subset(check_rows), recipe["top_k"])
    _, history = fit(fit_lists, recipe, recipe["epochs"], check=check_lists)
    best = max(range(len(history)), key=lambda e: (history[e]["MRR"], -e)) if history else 0
    base = list_figures(None, check_lists)
    chosen = history[best] if history else base
    epochs = best + 1
    head, _ = fit(candidate_lists(data, recipe["top_k"]), recipe, epochs)
    meta = {"model": recipe["model"], "model_id": _model_id(recipe["model"]),
            "trained_on": f"the {recipe['source']} training split of "
                          f"{Path(recipe['base_recipe']).name}",
            "images": len(data.items), "views": int(data.views.shape[1]), "epochs": epochs,
            "top_k": recipe["top_k"],
            "check": {"base": _rounded(base), "rerank": _rounded(chosen)},
            "recipe": written or {k: v for k, v in recipe.items() if k != "task"}}
    save_matcher(head, out, meta)
    summary = (f"rerank head: {len(data.items)} images x {data.views.shape[1]} views; "
               f"{epochs} epochs chosen on held-back products (check R@1 within the top "
               f"{recipe['top_k']}: base {base['R@1']:.3f}, re-ranked {chosen['R@1']:.3f}; "
               f"MRR {base['MRR']:.3f} -> {chosen['MRR']:.3f}); "
               f"{time.perf_counter() - started:.0f} s")
    if progress:
        print(summary)
    return summary


def _rounded(figures: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def _model_id(name: str) -> str:
    from vestis.models import Encoder

    return Encoder.from_name(name).model_id

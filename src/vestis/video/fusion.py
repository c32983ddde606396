"""Fusing a track's per-frame similarities into one score per catalog item.

A track has T frames; each frame has a similarity (cosine) with each of M candidate items
(the best of the item's images). Fusion turns the T x M matrix into M scores:

- ``max``: the best frame decides (one clear view suffices; one bad match fools it);
- ``mean``: every frame votes equally (robust to one bad frame, blind to frame quality);
- ``learned``: a small AsymNet-style fusion tree (Video2Shop, Cheng et al. 2017; survey):
  frames are grouped into windows of consecutive frames (clips), a fusion node pools each
  window, and a root node pools the windows. Each node weights its children by a softmax
  of a learned linear function of each child's similarity to the item and of its quality
  (the parser's score of the garment), so it can move from averaging (all weights zero,
  where it starts: exactly ``mean``) towards max-pooling, and trust confident detections
  more. Nodes of a level share their parameters (windows vary in number). Four weights
  and a calibration in all: a checkpoint of a few KB.

The frame-item similarity itself is the cosine of the catalog's embeddings (AsymNet learns a
similarity network; here the embedding model already is one), so fusion is all that is
learned. :func:`train_fusion` fits it on synthetic clips (:mod:`vestis.video.synth`) of the
*training* Luma products only, with a listwise ranking loss (softmax over the positive item
and the hardest negatives) or binary cross-entropy.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vestis.artifacts import artifact_path

#: Shipped learned fusions, by name (``learned``: the artifact ``fusion`` of
#: :data:`vestis.artifacts.ARTIFACTS`).
SHIPPED = {"learned": artifact_path("fusion", "video-fusion")}
FUSIONS = ("max", "mean", "learned")
#: Frames per window (level-1 node) of the fusion tree.
WINDOW = 4
#: Quality features per frame (see :func:`frame_quality`).
QUALITY_FEATURES = 1
#: Scale of similarity logits inside a node (cosines differ by hundredths).
SHARPNESS_SCALE = 10.0
#: Temperature of the listwise ranking loss.
LOSS_SCALE = 20.0
FORMAT = "vestis-video-fusion"


def frame_quality(scores: np.ndarray, detection: np.ndarray | None = None) -> np.ndarray:
    """(T, 1) quality features of a track's frames: the parser's score of the garment in
    each frame (1 when unknown). ``scores`` (T, M) only gives the frame count.

    A second feature, each frame's margin of its best item over the runner-up, was tried
    and dropped: it lowered held-back R@1 (0.898 against 0.927 in 5-fold cross-validation
    on the training tracks) by trusting frames that were confidently wrong."""
    frames = len(np.asarray(scores))
    detection = (np.ones(frames, dtype=np.float32) if detection is None
                 else np.asarray(detection, dtype=np.float32))
    return detection.reshape(frames, QUALITY_FEATURES)


def fuse_max(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32).max(axis=0)


def fuse_mean(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32).mean(axis=0)


class FusionNode(nn.Module):
    """Pools children's (per-item) scores with softmax weights of a learned linear function
    of each child's score and quality features; all-zero weights (the start) average."""

    def __init__(self, features: int = QUALITY_FEATURES):
        super().__init__()
        self.sharpness = nn.Parameter(torch.zeros(1))
        self.quality = nn.Parameter(torch.zeros(features))

    def forward(self, scores: torch.Tensor, quality: torch.Tensor, mask: torch.Tensor,
                prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``scores`` (..., C, M), ``quality`` (..., C, F), ``mask`` (..., C) of real
        children, ``prior`` (..., C) a fixed log-weight per child. Returns the pooled scores
        (..., M) and the children's mean quality (..., F)."""
        logits = SHARPNESS_SCALE * self.sharpness * scores
        logits = logits + (quality @ self.quality)[..., None]
        if prior is not None:
            logits = logits + prior[..., None]
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
        weights = torch.softmax(logits, dim=-2).nan_to_num(0.0)  # a window with no child: 0
        pooled = (weights * scores).sum(dim=-2)
        count = mask.sum(dim=-1, keepdim=True).clamp_min(1)
        mean_quality = (quality * mask[..., None]).sum(dim=-2) / count
        return pooled, mean_quality


class FusionTree(nn.Module):
    """Two-level fusion tree: frames -> windows of ``window`` frames -> root.

    The root weights each window by its frame count too (a fixed log prior), so the
    untrained tree is exactly the mean over frames. A final ``scale * s + bias``
    (scale > 0, order-preserving) calibrates scores for binary cross-entropy."""

    def __init__(self, window: int = WINDOW, features: int = QUALITY_FEATURES):
        super().__init__()
        self.window, self.features = window, features
        self.clip_node = FusionNode(features)
        self.root_node = FusionNode(features)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, scores: torch.Tensor, quality: torch.Tensor,
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``scores`` (B, T, M), ``quality`` (B, T, F), ``frame_mask`` (B, T) -> (B, M)."""
        batch, frames, items = scores.shape
        if frame_mask is None:
            frame_mask = torch.ones(batch, frames, dtype=torch.bool, device=scores.device)
        pad = (-frames) % self.window
        if pad:
            scores = nn.functional.pad(scores, (0, 0, 0, pad))
            quality = nn.functional.pad(quality, (0, 0, 0, pad))
            frame_mask = nn.functional.pad(frame_mask, (0, pad), value=False)
        windows = scores.shape[1] // self.window
        clip_scores, clip_quality = self.clip_node(
            scores.view(batch, windows, self.window, items),
            quality.view(batch, windows, self.window, -1),
            frame_mask.view(batch, windows, self.window))
        counts = frame_mask.view(batch, windows, self.window).sum(-1)
        fused, _ = self.root_node(clip_scores, clip_quality, counts > 0,
                                  prior=counts.clamp_min(1).float().log())
        return fused

    def calibrated(self, fused: torch.Tensor) -> torch.Tensor:
        """Logits for binary cross-entropy from fused scores."""
        return self.log_scale.exp() * LOSS_SCALE * fused + self.bias

    def tree_shape(self, frames: int) -> tuple[int, list[int]]:
        """(windows, frames per window) of the tree built over ``frames`` frames."""
        windows = max(1, math.ceil(frames / self.window))
        return windows, [min(self.window, frames - w * self.window) for w in range(windows)]


# -- fusion by name ------------------------------------------------------------------------
Fusion = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


class LearnedFusion:
    """A trained :class:`FusionTree` as a plain function of (T, M) scores and (T, F)
    quality features (computed from the scores when not given)."""

    def __init__(self, tree: FusionTree, meta: dict[str, Any] | None = None):
        self.tree = tree.eval()
        self.meta = meta or {}

    def __call__(self, scores: np.ndarray, quality: np.ndarray | None = None) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float32)
        if quality is None:
            quality = frame_quality(scores)
        with torch.no_grad():
            fused = self.tree(torch.from_numpy(scores)[None],
                              torch.from_numpy(np.asarray(quality, dtype=np.float32))[None])
        return fused[0].numpy()


def load_fusion(name: str | Path = "learned") -> Fusion:
    """``max``, ``mean``, ``learned`` (the shipped tree) or a checkpoint path, as a function
    ``fusion(scores (T, M), quality (T, F) | None) -> (M,)``."""
    key = str(name)
    if key == "max":
        return lambda scores, quality=None: fuse_max(scores)
    if key == "mean":
        return lambda scores, quality=None: fuse_mean(scores)
    path = SHIPPED.get(key, Path(key).expanduser())
    if not path.is_file():
        if key in SHIPPED:
            raise FileNotFoundError(f"the learned fusion's weights are missing: {path}; "
                                    "train them with vestis train "
                                    "configs/video_fusion.yaml, then vestis ship")
        raise ValueError(f"unknown fusion {key!r}: one of {', '.join(FUSIONS)} or a checkpoint")
    tree, meta = load_tree(path)
    return LearnedFusion(tree, meta)


def save_tree(tree: FusionTree, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "window": tree.window, "features": tree.features,
               "state": {k: v.detach().clone() for k, v in tree.state_dict().items()},
               "meta": meta or {}}
    torch.save(payload, path)
    return path


def load_tree(path: str | Path) -> tuple[FusionTree, dict[str, Any]]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vestis video-fusion checkpoint")
    tree = FusionTree(payload["window"], payload["features"])
    tree.load_state_dict(payload["state"])
    return tree.eval(), payload.get("meta", {})


# -- training ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrackExample:
    """One training track: (T, M) scores against M candidates (the positive first), and
    (T, F) quality features."""

    scores: np.ndarray
    quality: np.ndarray

    @staticmethod
    def from_scores(scores: np.ndarray, positive: int, detection: np.ndarray | None = None,
                    negatives: int = 20) -> TrackExample:
        """The positive column and the ``negatives`` hardest others (by mean score)."""
        scores = np.asarray(scores, dtype=np.float32)
        quality = frame_quality(scores, detection)
        others = [m for m in np.argsort(-scores.mean(axis=0)) if m != positive][:negatives]
        return TrackExample(scores[:, [positive, *others]], quality)


def collate(examples: Sequence[TrackExample]) -> tuple[torch.Tensor, ...]:
    """Padded (scores (B, T, M), quality (B, T, F), frame mask (B, T), item mask (B, M))."""
    frames = max(e.scores.shape[0] for e in examples)
    items = max(e.scores.shape[1] for e in examples)
    features = examples[0].quality.shape[1]
    scores = torch.zeros(len(examples), frames, items)
    quality = torch.zeros(len(examples), frames, features)
    frame_mask = torch.zeros(len(examples), frames, dtype=torch.bool)
    item_mask = torch.zeros(len(examples), items, dtype=torch.bool)
    for b, e in enumerate(examples):
        t, m = e.scores.shape
        scores[b, :t, :m] = torch.from_numpy(e.scores)
        quality[b, :t] = torch.from_numpy(e.quality)
        frame_mask[b, :t], item_mask[b, :m] = True, True
    return scores, quality, frame_mask, item_mask


def ranking_loss(tree: FusionTree, batch: tuple[torch.Tensor, ...], loss: str = "softmax"
                 ) -> torch.Tensor:
    """``softmax``: cross-entropy of the positive (column 0) among the candidates;
    ``bce``: binary cross-entropy, positive 1 and negatives 0, on calibrated logits."""
    scores, quality, frame_mask, item_mask = batch
    fused = tree(scores, quality, frame_mask)
    if loss == "softmax":
        logits = (LOSS_SCALE * fused).masked_fill(~item_mask, float("-inf"))
        return nn.functional.cross_entropy(logits, torch.zeros(len(fused), dtype=torch.long))
    if loss == "bce":
        target = torch.zeros_like(fused)
        target[:, 0] = 1.0
        per_item = nn.functional.binary_cross_entropy_with_logits(
            tree.calibrated(fused), target, reduction="none")
        return (per_item * item_mask).sum() / item_mask.sum()
    raise ValueError(f"loss must be softmax or bce, got {loss!r}")


def fit_fusion(examples: Sequence[TrackExample], *, epochs: int = 300, lr: float = 0.05,
               batch_size: int = 64, loss: str = "softmax", weight_decay: float = 1e-3,
               seed: int = 0, window: int = WINDOW) -> FusionTree:
    """A :class:`FusionTree` fitted on ``examples`` (Adam, mini-batches)."""
    if not examples:
        raise ValueError("no training tracks")
    torch.manual_seed(seed)
    order = random.Random(seed)
    tree = FusionTree(window, examples[0].quality.shape[1])
    optimiser = torch.optim.Adam(tree.parameters(), lr=lr, weight_decay=weight_decay)
    examples = list(examples)
    for _ in range(epochs):
        order.shuffle(examples)
        for start in range(0, len(examples), batch_size):
            optimiser.zero_grad()
            value = ranking_loss(tree, collate(examples[start:start + batch_size]), loss)
            value.backward()
            optimiser.step()
    return tree.eval()


def recall_at_1(examples: Sequence[TrackExample], fusion: Fusion) -> float:
    """Share of examples whose positive (column 0) gets the top fused score (ties lose)."""
    hits = 0
    for e in examples:
        fused = fusion(e.scores, e.quality)
        hits += int(fused[0] > np.delete(fused, 0).max()) if len(fused) > 1 else 1
    return hits / max(1, len(examples))


def train_fusion(catalog_csv: str | Path, out: str | Path, *,
                 max_items: int | None = None, clips_per_item: int = 1, seconds: float = 6.0,
                 size: tuple[int, int] = (320, 240), every: int = 25, epochs: int = 300,
                 negatives: int = 20, loss: str = "softmax", seed: int = 0,
                 model: str = "vestis-lite0", cache: str | Path | None = None,
                 progress: bool = True) -> FusionTree:
    """Fit the learned fusion on synthetic clips of the *training* products of a Luma-layout
    ``catalog_csv`` (:func:`vestis.data.products.product_split`) and save it to ``out``.

    Every training item (up to ``max_items``) is filmed (:func:`vestis.video.synth.make_clip`,
    pan, zoom or mixed by turns), tracked, and its track of the item's garment group scored
    against every training item of compatible groups; a fifth of the tracks is held back to
    report R@1 of max, mean and learned fusion before saving. ``cache``: a file that keeps
    the tracks' scores (made when missing, read when present) to refit without re-filming.
    """
    if cache is not None and Path(cache).is_file():
        examples = load_examples(cache)
    else:
        from vestis.video.search import clip_examples  # lazy: a circular import

        with tempfile.TemporaryDirectory() as work:
            examples = clip_examples(catalog_csv, Path(work), split="train",
                                     max_items=max_items, clips_per_item=clips_per_item,
                                     seconds=seconds, size=size, every=every,
                                     negatives=negatives, seed=seed, model=model,
                                     progress=progress)
        if cache is not None:
            save_examples(examples, cache)
    random.Random(seed).shuffle(examples)
    held = max(1, len(examples) // 5)
    fit, check = examples[held:], examples[:held]
    tree = fit_fusion(fit, epochs=epochs, loss=loss, seed=seed)
    report = {name: round(recall_at_1(check, load_fusion(name)), 4) for name in ("max", "mean")}
    report["learned"] = round(recall_at_1(check, LearnedFusion(tree)), 4)
    final = fit_fusion(examples, epochs=epochs, loss=loss, seed=seed)
    meta = {"trained_on": "synthetic clips of the train split (product_split) of " + Path(
        catalog_csv).name, "tracks": len(examples), "model": model, "loss": loss,
        "epochs": epochs, "held_back_r1": report}
    save_tree(final, out, meta)
    if progress:
        print(f"fusion: {len(examples)} tracks; held-back R@1 {report}; saved {out}")
    return final


#: Every key a video-fusion recipe may set, with its default (anything else is refused).
RECIPE_DEFAULTS: dict[str, Any] = {
    "task": "video-fusion", "catalog": None, "model": "vestis-lite0", "max_items": None,
    "clips_per_item": 1, "seconds": 6.0, "size": [320, 240], "every": 25, "epochs": 300,
    "negatives": 20, "loss": "softmax", "seed": 0, "cache": None,
}
#: The tree's file in a run folder (``vestis ship RUN fusion`` stores it).
RUN_FILE = "fusion.pt"


def train_from_recipe(path: str | Path, out: str | Path,
                      overrides: dict | None = None) -> FusionTree:
    """:func:`train_fusion` with the settings of a YAML recipe (configs/video_fusion.yaml),
    saved to ``out/fusion.pt``. An unknown key or a missing ``catalog`` is refused before
    any work starts."""
    from vestis.recipe_files import read_recipe, refuse_unknown_keys, require_paths

    recipe = {**read_recipe(path), **(overrides or {})}
    refuse_unknown_keys(recipe, RECIPE_DEFAULTS)
    recipe = {**RECIPE_DEFAULTS, **recipe}
    require_paths(recipe, ("catalog",), "recipe")
    del recipe["task"]
    catalog, size = recipe.pop("catalog"), tuple(recipe.pop("size"))
    Path(out).mkdir(parents=True, exist_ok=True)
    return train_fusion(catalog, Path(out) / RUN_FILE, size=size, **recipe)


def save_examples(examples: Sequence[TrackExample], path: str | Path) -> None:
    torch.save([{"scores": torch.from_numpy(e.scores), "quality": torch.from_numpy(e.quality)}
                for e in examples], Path(path))


def load_examples(path: str | Path) -> list[TrackExample]:
    return [TrackExample(e["scores"].numpy(), e["quality"].numpy())
            for e in torch.load(path, map_location="cpu", weights_only=True)]

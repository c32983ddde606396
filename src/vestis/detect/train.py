"""Train the garment parser's decoder on Clothing Co-Parsing masks (``vestis train`` of a
recipe with ``task: parser``).

The backbone is frozen, so its stage maps for a few views of every photo (the photo, its
mirror image, and seeded zoomed crops) are computed once and cached in memory; epochs then
train only the decoder, on batches drawn from those views. Deterministic from ``seed``.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from vestis.atomic import atomic_path
from vestis.images import load_image
from vestis.recipe_files import deep_merge, read_recipe, refuse_unknown_keys, require_paths

from .groups import GARMENT_GROUPS, GROUPS
from .metrics import (
    IGNORE,
    MaskedPhoto,
    confusion,
    dataset_lookup,
    load_group_mask,
    metrics_from_confusion,
    read_parsing_csv,
)
from .model import PIXEL_MEAN, PIXEL_STD, ParserConfig, ParserNet, save_parser

#: Every key a parser recipe may set (anything else is refused, naming it). ``data.csv`` has
#: no default: the recipe names it (configs/parser-lite0.yaml).
DEFAULTS: dict = {
    "task": "parser",
    "name": "parser",
    "seed": 0,
    "data": {"csv": None, "labels": None, "val_count": 110},
    "model": {"backbone": "lite0", "stages": [1, 2, 4, 6], "width": 64, "size": 384,
              "finetune_from_stage": None},
    # Training canvas (height, width): photos are fitted inside it, padding is ignored.
    "canvas": [384, 256],
    "augment": {"flip": True, "zoom_views": 1, "zoom": [1.15, 1.5]},
    "train": {
        "epochs": 12,
        "batch_size": 16,
        "lr": 0.003,
        "weight_decay": 0.0001,
        "warmup_epochs": 2,
        "dice_weight": 0.5,
        "class_weight_power": 0.5,
        "class_weight_max": 4.0,
        "loss_stride": 2,
        "val_every": 4,
        "backbone_lr_scale": 0.2,
        "threads": 2,
    },
    "cache_dir": "runs/parser-cache",
}


#: Photos per batch through the frozen backbone when caching views (full canvases: memory).
CACHE_BATCH = 8
#: Cached views per batch when scoring the validation split (decoder only).
VALIDATION_BATCH = 32
#: Cached maps per batch through the frozen stages below the fine-tuned one.
STAGE_INPUT_BATCH = 64


def load_recipe(path: str | Path, overrides: dict | None = None) -> dict:
    """The recipe and ``overrides`` over :data:`DEFAULTS`; an unknown key or a missing
    ``data.csv`` is refused before any work starts."""
    recipe = deep_merge(read_recipe(path), overrides or {})
    refuse_unknown_keys(recipe, DEFAULTS)
    merged = deep_merge(DEFAULTS, recipe)
    require_paths(merged["data"], ("csv",), "data")
    return merged


def split_rows(rows: list[MaskedPhoto], val_count: int, seed: int
               ) -> tuple[list[MaskedPhoto], list[MaskedPhoto]]:
    """The fixed validation split: a seeded shuffle of the rows sorted by image name; the
    first ``val_count`` are held out. Returns (train, val), each sorted by image name."""
    ordered = sorted(rows, key=lambda r: r.image.name)
    order = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted((ordered[i] for i in order[:val_count]), key=lambda r: r.image.name)
    train = sorted((ordered[i] for i in order[val_count:]), key=lambda r: r.image.name)
    return train, val


def recipe_split(recipe: dict) -> tuple[list[MaskedPhoto], list[MaskedPhoto], np.ndarray]:
    data = recipe["data"]
    rows = read_parsing_csv(data["csv"])
    train, val = split_rows(rows, int(data["val_count"]), int(recipe["seed"]))
    return train, val, dataset_lookup(data["csv"], data.get("labels"))


@dataclass(frozen=True)
class View:
    flip: bool = False
    crop: tuple[float, float, float, float] | None = None  # fractions x1, y1, x2, y2


def make_views(augment: dict, rng: np.random.Generator) -> list[View]:
    views = [View()]
    if augment.get("flip", True):
        views.append(View(flip=True))
    low, high = augment.get("zoom", [1.15, 1.5])
    for _ in range(int(augment.get("zoom_views", 0))):
        zoom = float(rng.uniform(low, high))
        side = 1.0 / zoom
        x1, y1 = (float(v) for v in rng.uniform(0, 1 - side, size=2))
        views.append(View(flip=bool(rng.integers(2)), crop=(x1, y1, x1 + side, y1 + side)))
    return views


def render_view(image: Image.Image, truth: np.ndarray, view: View, canvas: tuple[int, int]
                ) -> tuple[torch.Tensor, np.ndarray]:
    """The network input (1x3xHxW) and group mask (HxW, 255 = padding) of one view."""
    mask = Image.fromarray(truth)
    if view.crop is not None:
        w, h = image.size
        box = (round(view.crop[0] * w), round(view.crop[1] * h),
               round(view.crop[2] * w), round(view.crop[3] * h))
        image, mask = image.crop(box), mask.crop(box)
    if view.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    height, width = canvas
    scale = min(height / image.height, width / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    mask = mask.resize(size, Image.NEAREST)
    pixels = np.zeros((height, width, 3), dtype=np.float32)
    pixels[: size[1], : size[0]] = (np.asarray(image, np.float32) - PIXEL_MEAN) / PIXEL_STD
    target = np.full((height, width), IGNORE, dtype=np.uint8)
    target[: size[1], : size[0]] = np.asarray(mask)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).unsqueeze(0), target


@torch.inference_mode()
def cache_views(net: ParserNet, rows: list[MaskedPhoto], lookup: np.ndarray, canvas, augment,
                rng: np.random.Generator, desc: str, batch_size: int = CACHE_BATCH
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stage maps (fp16) and group masks of every view of every row."""
    from tqdm.auto import tqdm

    feats: list[list[torch.Tensor]] = [[] for _ in net.config.stages]
    masks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            for level, feature in enumerate(net.features(torch.cat(pending))):
                feats[level].extend(feature.half())
            pending.clear()

    for row in tqdm(rows, desc=desc, unit="photo"):
        image = load_image(row.image)
        truth = load_group_mask(row.mask, lookup)
        for view in make_views(augment, rng) if augment else [View()]:
            x, target = render_view(image, truth, view, canvas)
            pending.append(x)
            masks.append(torch.from_numpy(target))
            if len(pending) >= batch_size:
                flush()
    flush()
    return [torch.stack(level) for level in feats], torch.stack(masks)


def cached_views(net: ParserNet, rows, lookup, recipe: dict, augment, rng, desc: str):
    """:func:`cache_views`, kept on disk under ``cache_dir`` keyed by everything it depends
    on (the random views too, as ``rng`` is consumed identically on a cache hit)."""
    import hashlib
    import json

    # The backbone maps do not depend on which stages are fine-tuned afterwards.
    model = {k: v for k, v in recipe["model"].items() if k != "finetune_from_stage"}
    key_data = {"model": model, "canvas": recipe["canvas"], "augment": augment,
                "seed": recipe["seed"], "rows": [str(r.image) for r in rows], "v": 3}
    key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = recipe.get("cache_dir")
    path = Path(cache_dir) / f"{desc.split()[-2]}-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        for _ in rows:  # consume the generator exactly as a fresh run would
            if augment:
                make_views(augment, rng)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return payload["feats"], payload["masks"]
    feats, masks = cache_views(net, rows, lookup, tuple(recipe["canvas"]), augment, rng, desc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"feats": feats, "masks": masks}, tmp)
    return feats, masks


def class_weights(masks: torch.Tensor, num_classes: int, power: float, cap: float
                  ) -> torch.Tensor:
    counts = torch.bincount(masks[masks != IGNORE].long().flatten(), minlength=num_classes)
    freq = counts.double() / counts.sum()
    weights = (freq.median() / freq.clamp_min(1e-6)) ** power
    weights = weights.clamp(1.0 / cap, cap)
    return (weights / weights.mean()).float()


def parsing_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                 dice_weight: float, stride: int = 1) -> torch.Tensor:
    """Weighted cross-entropy plus soft Dice over the non-background groups, at 1/``stride``
    of the target's resolution (the target is subsampled, nearest)."""
    if stride > 1:
        target = target[:, stride // 2::stride, stride // 2::stride]
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    target = target.long()
    loss = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    if dice_weight > 0:
        valid = (target != IGNORE).unsqueeze(1)
        probs = logits.softmax(1) * valid
        onehot = F.one_hot(target.clamp_max(logits.shape[1] - 1), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2) * valid
        inter = (probs * onehot).sum((0, 2, 3))
        total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        present = onehot.sum((0, 2, 3))[1:] > 0
        dice = 1 - (2 * inter[1:] + 1) / (total[1:] + 1)
        if present.any():
            loss = loss + dice_weight * dice[present].mean()
    return loss


@torch.inference_mode()
def validate(net: ParserNet, feats: list[torch.Tensor], masks: torch.Tensor,
             stage_input: torch.Tensor | None = None,
             batch_size: int = VALIDATION_BATCH) -> np.ndarray:
    net.eval()
    matrix = np.zeros((len(GROUPS),) * 2, dtype=np.int64)
    for start in range(0, len(masks), batch_size):
        logits = forward_cached(net, feats, stage_input, slice(start, start + batch_size))
        target = masks[start:start + batch_size]
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                               align_corners=False)
        matrix += confusion(logits.argmax(1).numpy(), target.numpy())
    return matrix


def write_split_csv(rows: list[MaskedPhoto], path: Path) -> None:
    """A CCP-format CSV of ``rows``, paths relative to the CSV's folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask"])
        for row in rows:
            writer.writerow([os.path.relpath(row.image.resolve(), path.parent.resolve()),
                             os.path.relpath(row.mask.resolve(), path.parent.resolve())])


def derive_stage_input(net: ParserNet, feats: list[torch.Tensor],
                       batch_size: int = STAGE_INPUT_BATCH
                       ) -> torch.Tensor | None:
    """For fine-tuning from stage F: the output of stage F - 1 (what enters F), computed by
    the frozen stages from the highest cached stage below F."""
    start = net.config.finetune_from_stage
    if start is None:
        return None
    stages = list(net.config.stages)
    if start - 1 in stages:
        return feats[stages.index(start - 1)]
    below = max(s for s in stages if s < start - 1)
    source = feats[stages.index(below)]
    out = []
    with torch.inference_mode():
        for i in range(0, len(source), batch_size):
            out.append(net.backbone.run_stages(source[i:i + batch_size].float(), below + 1,
                                               start)[-1].half())
    return torch.cat(out)


def forward_cached(net: ParserNet, feats: list[torch.Tensor], stage_input: torch.Tensor | None,
                   index) -> torch.Tensor:
    """Decoder logits from cached maps; fine-tuned stages run from ``stage_input``."""
    stages = list(net.config.stages)
    start = net.config.finetune_from_stage
    batch = [f[index].float() for f in feats]
    if start is not None:
        outputs = net.backbone.run_stages(stage_input[index].float(), start, max(stages) + 1)
        for offset, output in enumerate(outputs):
            if start + offset in stages:
                batch[stages.index(start + offset)] = output
    return net.decoder(batch)


@dataclass
class TrainResult:
    checkpoint: Path
    epochs: int
    seconds: float
    val_miou: float


def train_parser(recipe_path: str | Path, out: str | Path, overrides: dict | None = None
                 ) -> TrainResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    opts = recipe["train"]
    torch.set_num_threads(int(opts.get("threads") or torch.get_num_threads()))
    seed = int(recipe["seed"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    train_rows, val_rows, lookup = recipe_split(recipe)
    write_split_csv(val_rows, out / "val.csv")
    write_split_csv(train_rows, out / "train.csv")
    data_dir = Path(recipe["data"]["csv"]).parent
    labels_src = Path(recipe["data"].get("labels") or data_dir / "labels.txt")
    (out / "labels.txt").write_text(labels_src.read_text())

    config = ParserConfig.from_dict(recipe["model"])
    net = ParserNet(config)
    train_feats, train_masks = cached_views(net, train_rows, lookup, recipe, recipe["augment"],
                                            rng, "caching train views")
    val_feats, val_masks = cached_views(net, val_rows, lookup, recipe, None, rng,
                                        "caching val views")
    cache_seconds = time.perf_counter() - started

    decoder = net.decoder
    train_input = derive_stage_input(net, train_feats)
    val_input = derive_stage_input(net, val_feats)
    weights = class_weights(train_masks, len(GROUPS), float(opts["class_weight_power"]),
                            float(opts["class_weight_max"]))
    param_groups = [{"params": list(decoder.parameters()), "lr": float(opts["lr"])}]
    if config.finetune_from_stage is not None:
        # Fine-tuned stages train at a lower rate; their BatchNorm statistics stay frozen.
        keys = set(net.trained_backbone_keys())
        tuned = [p for n, p in net.backbone.named_parameters() if n in keys]
        for parameter in tuned:
            parameter.requires_grad_(True)
        param_groups.append({"params": tuned,
                             "lr": float(opts["lr"]) * float(opts["backbone_lr_scale"])})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=float(opts["weight_decay"]))
    epochs, batch_size = int(opts["epochs"]), int(opts["batch_size"])
    views = len(train_masks)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = int(opts["warmup_epochs"]) * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    log_path = out / "log.csv"
    fields = ["epoch", "loss", "val_miou", "val_pixel_accuracy",
              *[f"iou_{g}" for g in GROUPS], "lr", "seconds"]
    with open(log_path, "w", newline="") as handle:
        csv.writer(handle).writerow(fields)
    generator = torch.Generator().manual_seed(seed)
    metrics = None
    bar = tqdm(range(1, epochs + 1), desc="training decoder", unit="epoch")
    for epoch in bar:
        decoder.train()
        # One epoch = as many samples as training photos, drawn from all cached views.
        order = torch.randperm(views, generator=generator)[: steps_per_epoch * batch_size]
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = parsing_loss(forward_cached(net, train_feats, train_input, index),
                                train_masks[index], weights,
                                float(opts["dice_weight"]), int(opts["loss_stride"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
        if epoch % int(opts["val_every"]) and epoch != epochs:
            with open(log_path, "a", newline="") as handle:
                csv.writer(handle).writerow(
                    [epoch, round(total / count, 5), *[""] * (len(fields) - 4),
                     f"{scheduler.get_last_lr()[0]:.6f}",
                     round(time.perf_counter() - started, 1)])
            bar.set_postfix(loss=f"{total / count:.3f}")
            continue
        metrics = metrics_from_confusion(validate(net, val_feats, val_masks, val_input), GROUPS,
                                         len(val_rows))
        row = [epoch, round(total / count, 5), round(metrics.miou, 5),
               round(metrics.pixel_accuracy, 5),
               *[round(metrics.iou[g], 5) for g in GROUPS],
               f"{scheduler.get_last_lr()[0]:.6f}", round(time.perf_counter() - started, 1)]
        with open(log_path, "a", newline="") as handle:
            csv.writer(handle).writerow(row)
        bar.set_postfix(loss=f"{total / count:.3f}", val_miou=f"{metrics.miou:.3f}")
        meta = {
            "recipe": recipe,
            "epoch": epoch,
            "val_count": len(val_rows),
            "val_metrics_canvas": metrics.to_dict(),
            "garment_groups": list(GARMENT_GROUPS),
            "train_seconds": round(time.perf_counter() - started, 1),
            "cache_seconds": round(cache_seconds, 1),
        }
        save_parser(net, out / "last.pt", meta)
    return TrainResult(out / "last.pt", epochs, time.perf_counter() - started,
                       metrics.miou if metrics else float("nan"))

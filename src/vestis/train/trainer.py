"""``train(recipe)``: data + model + loss → a checkpoint that ``create_model(path)`` loads.

With a frozen backbone (the default on CPU), the pooled backbone features of several
augmented views of every training image are computed once and cached; epochs then train
the head on the cache, which makes a full recipe fit a CPU budget. With an unfrozen
backbone, images go through the model every step.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from vestis.atomic import atomic_path
from vestis.data import (
    ConsumerStyle,
    ImageDataset,
    PKSampler,
    build_train_transform,
    list_backgrounds,
    source_balanced_weights,
)
from vestis.evaluation import retrieval_metrics
from vestis.images import Preprocess, crop_box, load_image
from vestis.losses import EpochContext, TrainBatch, create_loss
from vestis.losses.distill import RelationalDistillation
from vestis.models import create_model, save_checkpoint
from vestis.models.registry import needs_category_count
from vestis.records import ImageRecord
from vestis.train.attention_pretrain import pretrain_attention, pretrain_spec
from vestis.train.config import load_config
from vestis.train.landmark_targets import pretrain_landmarks
from vestis.train.sources import ValidationSet, build_sources

BEST, LAST, STATE, LOG, RESOLVED = "best.pt", "last.pt", "state.pt", "log.csv", "config.yaml"
# Recipe `model` keys that steer training rather than build the network.
TRAINING_KEYS = ("architecture", "freeze_backbone", "finetune_from_stage", "category_loss_weight",
                 "category_label_smoothing", "init_from", "test_size", "attention_pretrain",
                 "landmark_pretrain", "imagenet_distill")
ATTENTION_PRETRAIN, LANDMARK_PRETRAIN = "attention_pretrain.json", "landmark_pretrain.json"


@dataclass
class TrainResult:
    out_dir: Path
    best_path: Path
    best_score: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(
    recipe: str | Path | dict,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overrides: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run a training recipe and write best.pt, last.pt, config.yaml and log.csv to ``out_dir``."""
    config = load_config(recipe, overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESOLVED).write_text(yaml.safe_dump(config, sort_keys=False))
    seed_everything(config["seed"])
    device = pick_device(config["device"])
    return Trainer(config, out_dir, device, progress).run(resume)


class Trainer:
    def __init__(self, config: dict[str, Any], out_dir: Path, device: torch.device, progress):
        self.started = time.perf_counter()  # the budget counts feature caching too
        self.config, self.out_dir, self.device, self.progress = config, out_dir, device, progress
        self.train_samples, self.validation = build_sources(config)
        self.dataset = ImageDataset(self.train_samples)
        model_config = {k: v for k, v in config["model"].items() if k not in TRAINING_KEYS}
        if model_config.get("category_weight"):
            model_config["category_classes"] = len(self.dataset.category_names)
        if needs_category_count(config["model"]["architecture"]):
            model_config["num_categories"] = len(self.dataset.category_names)
        self.category_loss_weight = float(config["model"].get("category_loss_weight", 1.0))
        self.label_smoothing = float(config["model"].get("category_label_smoothing", 0.0))
        self.model = create_model(config["model"]["architecture"], **model_config).to(device)
        if config["model"].get("init_from"):
            init_from_checkpoint(self.model, config["model"]["init_from"])
        self.attention_pretrain = pretrain_spec(config["model"].get("attention_pretrain"))
        if self.attention_pretrain and not hasattr(self.model, "low_level_map"):
            raise ValueError("model.attention_pretrain needs an attention model (impdrop_net)")
        self._pretrain_landmarks(config["model"].get("landmark_pretrain"))
        self.frozen = bool(config["model"]["freeze_backbone"])
        self.cut = config["model"].get("finetune_from_stage") if self.frozen else None
        _check_head_stage(self.model, self.frozen, self.cut)
        self.loss = create_loss(
            config["loss"],
            num_labels=len(self.dataset.label_names),
            num_categories=len(self.dataset.category_names),
            feature_dim=self.model.adapter_output_dim,
            embed_dim=self.model.embed_dim,
        ).to(device)
        self.features = self._make_feature_source()
        self.distill_weight = float(config["model"].get("imagenet_distill") or 0.0)
        self.teacher = self._imagenet_teacher() if self.distill_weight else None
        self.distill = RelationalDistillation()
        # The feature source has kept the backbone's own input size for training views; from
        # here on, validation and the saved model embed at test_size (see serving_preprocess).
        self.model.preprocess = serving_preprocess(self.model.preprocess,
                                                   config["model"].get("test_size"))
        self.sampler = self._make_sampler()
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = len(self.sampler)

    # -- set-up ------------------------------------------------------------------------
    def _make_feature_source(self):
        if self.frozen:
            for parameter in self.model.backbone.parameters():
                parameter.requires_grad_(False)
            for parameter in self._finetuned_backbone_parameters():
                parameter.requires_grad_(True)
            return CachedFeatures(self.model, self.dataset, self.config, self.device, self.progress,
                                  cut=self.cut)
        return LiveImages(self.model, self.dataset, self.config, self.device)

    def _make_sampler(self) -> PKSampler:
        sampler_config = self.config["sampler"]
        return PKSampler(
            self.dataset.labels,
            sampler_config["p"],
            sampler_config["k"],
            groups=self.dataset.groups,
            categories=self.dataset.categories,
            hard_negative_fraction=sampler_config.get("hard_negative_fraction", 0.0),
            neighbours=self.loss.neighbours,
            min_per_label=1 if self.frozen else 2,
            batches_per_epoch=sampler_config.get("batches_per_epoch"),
            label_weights=self._label_weights(),
            seed=self.config["seed"],
        )

    def _label_weights(self) -> list[float] | None:
        """With ``sampler.balance_sources``, every source gets an equal share of the batches."""
        if not self.config["sampler"].get("balance_sources"):
            return None
        return source_balanced_weights([name.split(":", 1)[0]
                                        for name in self.dataset.label_names])

    def _finetuned_modules(self) -> list[torch.nn.Module]:
        """Backbone stages fine-tuned on the cached maps (at ``backbone_lr_scale``): stages
        ``cut`` and up, or those the model names, e.g. its own copies of stages."""
        if self.cut is None:
            return []
        return self.model.finetuned_backbone_modules(self.cut)

    def _finetuned_backbone_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self._finetuned_modules() for p in module.parameters()]

    def _param_groups(self) -> list[dict]:
        """Head and loss parameters at the base rate; backbone ones, and a model's fine-tuned
        copies of backbone stages, at ``backbone_lr_scale``."""
        backbone = {id(p) for p in self.model.backbone.parameters()}
        backbone |= {id(p) for p in self._finetuned_backbone_parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        trainable += [p for p in self.loss.parameters() if p.requires_grad]
        scale = float(self.config["optimizer"].get("backbone_lr_scale", 1.0))
        groups = [{"params": [p for p in trainable if id(p) not in backbone], "lr_scale": 1.0},
                  {"params": [p for p in trainable if id(p) in backbone], "lr_scale": scale}]
        return [group for group in groups if group["params"]]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        spec = self.config["optimizer"]
        groups = self._param_groups()
        if spec["name"] == "sgd":
            return torch.optim.SGD(groups, lr=spec["lr"], momentum=0.9,
                                   weight_decay=spec.get("weight_decay", 0.0))
        return torch.optim.AdamW(groups, lr=spec["lr"], weight_decay=spec.get("weight_decay", 0.0))

    def _saved_backbone(self) -> bool | list[str]:
        """Which backbone weights a checkpoint needs: all, none, or the fine-tuned stages'."""
        if not self.frozen:
            return True
        if self.cut is None:
            return False
        names = {id(module): name for name, module in self.model.named_modules()}
        prefixes = tuple(f"{names[id(module)]}." for module in self._finetuned_modules())
        return [key for key in self.model.state_dict() if key.startswith(prefixes)]

    def learning_rate(self, step: int) -> float:
        base = self.config["optimizer"]["lr"]
        schedule = self.config["schedule"]
        warmup = schedule.get("warmup_epochs", 0) * self.steps_per_epoch
        if step < warmup:
            return base * (step + 1) / warmup
        if schedule["name"] == "constant":
            return base
        total = max(1, self.config["epochs"] * self.steps_per_epoch - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / total)))

    # -- the loop ----------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        start_epoch, best, history = self._resume() if resume else (0, -1.0, [])
        if not resume:
            self._pretrain_attention()
            self._init_head()
        budget = self.config["time_budget_minutes"] * 60
        epoch = start_epoch
        for epoch in range(start_epoch, self.config["epochs"]):
            self.loss.on_epoch_start(epoch, self._epoch_context())
            losses = self._train_epoch(epoch, budget)
            metrics = self.evaluate()
            row = {"epoch": epoch + 1, "seconds": round(self.elapsed(), 1), **losses, **metrics}
            history.append(row)
            score = metrics.get("val_score", -losses.get("loss", 0.0))
            if score > best:
                best = score
                self._save(BEST, epoch, row)
            self._save(LAST, epoch, row)
            self._save_state(epoch + 1, best, history)
            self._write_log(history)
            if self.progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
                tqdm.write(f"epoch {epoch + 1}: {shown}")
            if self.elapsed() > budget:
                break
        return TrainResult(self.out_dir, self.out_dir / BEST, best, len(history), self.elapsed(),
                           history)

    def _pretrain_landmarks(self, spec: dict | None) -> None:
        """``model.landmark_pretrain``: FashionNet's landmark branch learns the landmarks read
        off CCP masks (:mod:`vestis.train.landmark_targets`) before the features pooled at its
        predictions are cached; error before/after in ``landmark_pretrain.json``."""
        if not spec:
            return
        if not hasattr(self.model, "landmark_head"):
            raise ValueError("model.landmark_pretrain needs a landmark model (fashionnet)")
        summary = pretrain_landmarks(self.model, spec, self.config["seed"])
        (self.out_dir / LANDMARK_PRETRAIN).write_text(json.dumps(summary, indent=1))
        if self.progress:
            tqdm.write(f"landmark pre-training: {summary}")

    def _pretrain_attention(self) -> None:
        """``model.attention_pretrain``: the attention learns the CCP person/garment masks
        first (:mod:`vestis.train.attention_pretrain`); before/after agreement is written to
        ``attention_pretrain.json``."""
        if not self.attention_pretrain:
            return
        summary = pretrain_attention(self.model, self.attention_pretrain, self.config["seed"])
        (self.out_dir / ATTENTION_PRETRAIN).write_text(json.dumps(summary, indent=1))
        if self.progress:
            tqdm.write(f"attention pre-training: {summary}")

    def _init_head(self) -> None:
        """A model with a data-dependent initialisation (``init_head``, e.g. BIER's independent
        learners) gets the plain training features once, before the first epoch."""
        self.model.init_head(self.features.plain_train_features().to(self.device))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _train_epoch(self, epoch: int, budget: float) -> dict[str, float]:
        self.model.train()
        if self.frozen:
            self.model.backbone.eval()
            for module in self._finetuned_modules():
                module.train()
        self.sampler.set_epoch(epoch)
        totals: dict[str, float] = {}
        steps = 0
        bar = tqdm(self.sampler, desc=f"epoch {epoch + 1}", disable=not self.progress,
                   leave=False)
        for step, indices in enumerate(bar):
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr_scale"] * self.learning_rate(
                    epoch * self.steps_per_epoch + step)
            rows = self.features.train_rows(indices) if self.teacher is not None else None
            batch = self._batch(indices, epoch, rows)
            output = self.loss(batch)
            total = output.total
            if rows is not None:
                distill = self.distill(batch.embeddings, self._teacher_vectors(rows["entry"]))
                total = total + self.distill_weight * distill
                output.parts["imagenet_distill"] = float(distill.detach())
            if self.model.classifier is not None:
                category = F.cross_entropy(self.model.category_logits(batch.features),
                                           batch.categories, ignore_index=-1,
                                           label_smoothing=self.label_smoothing)
                total = total + self.category_loss_weight * category
                output.parts["category_ce"] = float(category.detach())
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            steps += 1
            totals["loss"] = totals.get("loss", 0.0) + float(total.detach())
            for key, value in output.parts.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            if self.elapsed() > budget:
                break
        return {key: value / max(1, steps) for key, value in totals.items()}

    def _imagenet_teacher(self) -> nn.Module:
        """A frozen copy of the backbone as it starts (ImageNet weights), for
        ``model.imagenet_distill``: its head features of the cached views are the teacher."""
        if self.cut is None:
            raise ValueError("model.imagenet_distill needs finetune_from_stage (the teacher "
                             "runs on the cached lower-stage maps)")
        teacher = copy.deepcopy(self.model.backbone).eval()
        return teacher.requires_grad_(False)

    def _teacher_vectors(self, entry: torch.Tensor) -> torch.Tensor:
        """The ImageNet model's average-pooled head features (what ``lite0`` embeds)."""
        with torch.no_grad():
            x = entry.to(self.device).float()
            if self.cut < len(self.teacher.stage_ends):
                x = self.teacher.run_stages(x, self.cut)[-1]
            return F.adaptive_avg_pool2d(self.teacher.head(x), 1).flatten(1)

    def _batch(self, indices: list[int], epoch: int, rows: dict | None = None) -> TrainBatch:
        features = (self.features.train_features(indices) if rows is None
                    else self.features.features_of(rows))
        adapted, embeddings = self.model.head(features)
        index = torch.as_tensor(indices)
        return TrainBatch(
            embeddings=embeddings,
            features=adapted,
            labels=torch.as_tensor(self.dataset.labels)[index].to(self.device),
            categories=torch.as_tensor(self.dataset.categories)[index].to(self.device),
            epoch=epoch,
        )

    def _epoch_context(self) -> EpochContext:
        def embed_train_set() -> tuple[np.ndarray, np.ndarray]:
            vectors = self.embed_features(self.features.plain_train_features())
            return vectors, np.asarray(self.dataset.labels)

        return EpochContext(
            num_labels=len(self.dataset.label_names),
            num_categories=len(self.dataset.category_names),
            embed_train_set=embed_train_set,
        )

    # -- evaluation --------------------------------------------------------------------
    def embed_features(self, features: torch.Tensor) -> np.ndarray:
        self.model.eval()
        with torch.inference_mode():
            vectors = [
                F.normalize(self.model.embed_features(chunk.to(self.device)), dim=1).cpu()
                for chunk in features.split(512)
            ]
        return torch.cat(vectors).numpy()

    def evaluate(self) -> dict[str, float]:
        """Metrics of every validation split; ``val_score`` (what picks best.pt) is the mean of
        R@1 + mAP over the splits."""
        metrics: dict[str, float] = {}
        scores = []
        for validation in self.validation:
            labels = [sample.item_id for sample in validation.samples]
            if len(set(labels)) == len(labels):
                continue  # no two images share a label: nothing to retrieve
            vectors = self.embed_features(self.features.validation_features(validation))
            split = split_metrics(vectors, validation)
            metrics.update(split)
            scores.append(split[f"{validation.name}_R@1"] + split[f"{validation.name}_mAP"])
        if scores:
            metrics["val_score"] = float(np.mean(scores))
        return metrics

    # -- files -------------------------------------------------------------------------
    def _save(self, name: str, epoch: int, row: dict) -> None:
        meta = {"epoch": epoch + 1, "metrics": row, "recipe": self.config}
        save_checkpoint(self.model, self.out_dir / name, include_backbone=self._saved_backbone(),
                        meta=meta)

    def _save_state(self, next_epoch: int, best: float, history: list) -> None:
        state = {
            "next_epoch": next_epoch,
            "best": best,
            "history": history,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        }
        with atomic_path(self.out_dir / STATE) as tmp:
            torch.save(state, tmp)

    def _resume(self) -> tuple[int, float, list]:
        path = self.out_dir / STATE
        if not path.exists():
            raise FileNotFoundError(f"{path}: nothing to resume from")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        return state["next_epoch"], state["best"], state["history"]

    def _write_log(self, history: list[dict]) -> None:
        columns = sorted({key for row in history for key in row},
                         key=lambda k: (k not in ("epoch", "seconds"), k))
        with open(self.out_dir / LOG, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)


def init_from_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Start from a checkpoint's weights (a pretraining stage): every tensor whose name and
    shape match is loaded; others (a classifier over other categories) keep their fresh
    initialisation. Returns the names loaded; none at all is an error."""
    from vestis.models.checkpoint import read_checkpoint
    from vestis.models.quantize import unpack

    payload = read_checkpoint(path)
    own = model.state_dict()
    loaded = {key: unpack(value).to(own[key].dtype) for key, value in payload["state_dict"].items()
              if key in own and tuple(unpack(value).shape) == tuple(own[key].shape)}
    if not loaded:
        raise ValueError(f"{path}: no weights match this model; was it trained with the same "
                         "backbone, levels and embedding size?")
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def _check_head_stage(model, frozen: bool, cut: int | None) -> None:
    """A model whose trainable head reads the map entering a backbone stage
    (``head_from_stage``, e.g. capsnet) trains on cached maps from exactly that cut."""
    stage = model.head_from_stage
    if frozen and stage is not None and cut != stage:
        raise ValueError(f"architecture {model.architecture!r} trains on the map entering "
                         f"stage {stage}: set model.finetune_from_stage: {stage} (got {cut})")


def split_metrics(vectors: np.ndarray, validation: ValidationSet) -> dict[str, float]:
    """Leave-one-out R@1, R@10, mAP and MAP@R of one validation split, keyed by its name."""
    labels = [sample.item_id for sample in validation.samples]
    result = retrieval_metrics(vectors, labels, vectors, labels,
                               query_gallery_index=np.arange(len(labels)), ks=(1, 10))
    return {f"{validation.name}_{key}": float(result.metrics[key])
            for key in ("R@1", "R@10", "mAP", "MAP@R")}


def serving_preprocess(train: Preprocess, test_size: int | None) -> Preprocess:
    """The preprocessing of validation and of the saved model: ``train``'s, at ``test_size``.

    Random-resized-crop training shows garments larger than a whole photo does, so embedding
    at a somewhat larger size than the training views can match their apparent size better
    (Touvron et al., "Fixing the train-test resolution discrepancy", 2019).
    """
    if not test_size:
        return train
    if int(test_size) < 32:
        raise ValueError(f"test size must be at least 32 pixels, got {test_size}")
    return replace(train, size=int(test_size))


def plain_features(model, samples: list[ImageRecord], batch_size: int, device,
                   preprocess: Preprocess | None = None) -> torch.Tensor:
    """Extracted features of un-augmented images, in batches, without gradients."""
    preprocess = preprocess or model.preprocess
    chunks = []
    for start in range(0, len(samples), batch_size):
        arrays = [preprocess.to_array(_open(s)) for s in samples[start:start + batch_size]]
        with torch.inference_mode():
            batch = torch.from_numpy(np.stack(arrays)).to(device)
            chunks.append(model.extract(batch).float().cpu())
    return torch.cat(chunks)


class CachedFeatures:
    """Backbone features of augmented views of every image, computed once (frozen backbone).

    View 0 of each image is the plain, un-augmented one. With ``cut`` (fine-tuning stages
    ``cut`` and up), the cache holds what enters stage ``cut`` (fp16 maps) and the pooled
    levels below it; the fine-tuned stages run on it at every step.
    """

    def __init__(self, model, dataset: ImageDataset, config: dict, device, progress: bool,
                 cut: int | None = None):
        self.model, self.dataset, self.device, self.cut = model, dataset, device, cut
        self.preprocess: Preprocess = model.preprocess
        cache = config["cache"]
        self.views = max(1, int(cache["views"]))
        self.augment = build_train_transform(config["augment"], self.preprocess,
                                             seed=config["seed"])
        self.synthesis = _consumer_style(cache, config["seed"])
        self.synthetic_fraction = float(cache.get("synthetic_fraction", 0.0))
        self.seed = config["seed"]
        self.rng = random.Random(self.seed)
        self.batch_size = config["batch_size_eval"]
        self.progress = progress
        self.cache = self._load_or_extract(dataset.samples, config)  # name → (views, N, ...)
        self._validation_cache: dict[str, dict[str, torch.Tensor]] = {}

    def _view(self, image, key: str, view: int) -> np.ndarray:
        """View ``view`` of the image whose :func:`_image_key` is ``key``. Its randomness
        depends on the image and the view alone, not on the sample list, so every run with
        the same settings (another fold, another recipe) can reuse an image's cached views."""
        if view == 0:
            return self.preprocess.to_array(image)
        rng = random.Random(f"{self.seed}:{key}:{view}")
        if self.synthesis is not None and rng.random() < self.synthetic_fraction:
            image = self.synthesis(image, rng)
        return self.augment(image, rng)

    def _load_or_extract(self, samples: list[ImageRecord], config: dict) -> dict:
        """Reuse the views of every image that an earlier run with the same settings cached.

        The cache is a folder per setting (backbone, cut, augmentation, views, seed) with one
        file per image, so folds and recipes that share images share their views."""
        folder = config["cache"].get("dir")
        if not folder:
            parts = [part for _, part in self._extract_views(samples)]
            return {name: torch.cat([part[name] for part in parts], dim=1) for name in parts[0]}
        root = Path(folder) / _cache_key(config, self.model.cache_tag)
        paths = [root / f"{_image_key(sample)}.pt" for sample in samples]
        missing = [i for i, path in enumerate(paths) if not path.exists()]
        if missing:
            root.mkdir(parents=True, exist_ok=True)
        # Each image's file is written as soon as its views exist: an interrupted run keeps
        # what it did.
        for chunk, part in self._extract_views([samples[i] for i in missing]):
            for offset, index in enumerate(chunk):
                with atomic_path(paths[missing[index]]) as tmp:
                    torch.save({name: value[:, offset].clone() for name, value in part.items()},
                               tmp)
        loaded = [torch.load(path, weights_only=True) for path in paths]
        return {name: torch.stack([entry[name] for entry in loaded], dim=1)
                for name in loaded[0]}

    def _extract_views(self, samples: list[ImageRecord]):
        """Per batch of ``samples``: its positions and its (views, batch, ...) tensors."""
        bar = tqdm(total=len(samples) * self.views, desc="caching features", unit="view",
                   disable=not self.progress)
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            images = [_open(sample) for sample in chunk]
            keys = [_image_key(sample) for sample in chunk]
            part: dict[str, torch.Tensor] = {}
            for view in range(self.views):
                arrays = np.stack([self._view(image, key, view)
                                   for image, key in zip(images, keys, strict=True)])
                for name, value in self._extract(arrays).items():
                    if name not in part:
                        part[name] = value.new_zeros((self.views, len(chunk), *value.shape[1:]))
                    part[name][view] = value
                bar.update(len(chunk))
            yield range(start, start + len(chunk)), part
        bar.close()

    def _extract(self, arrays: np.ndarray) -> dict[str, torch.Tensor]:
        """Frozen features of preprocessed views, always in eval mode: the validation views
        are first extracted mid-training, and a module of ``extract`` with batch norm (such
        as FashionNet's landmark branch) must give what the saved model gives at search."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                batch = torch.from_numpy(arrays).to(self.device)
                if self.cut is None:
                    return {"features": self.model.extract(batch).float().cpu()}
                entry, lower = self.model.extract_lower(batch, self.cut)
                return {"entry": entry.half().cpu(), "lower": lower.float().cpu()}
        finally:
            self.model.train(was_training)

    def _features(self, cached: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cut is None:
            return cached["features"].to(self.device)
        return self.model.extract_upper(cached["entry"].to(self.device).float(),
                                        cached["lower"].to(self.device), self.cut)

    def _plain_features(self, cached: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of cached plain views, in eval mode and without gradients."""
        if self.cut is None:
            return cached["features"]
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            count = len(cached["entry"])
            chunks = [self._features({name: value[start:start + self.batch_size]
                                      for name, value in cached.items()}).cpu()
                      for start in range(0, count, self.batch_size)]
        self.model.train(was_training)
        return torch.cat(chunks)

    def train_features(self, indices: list[int]) -> torch.Tensor:
        """One view per position; an image repeated in the batch gets different views."""
        return self.features_of(self.train_rows(indices))

    def train_rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The cached tensors of one view per position (see :meth:`train_features`)."""
        picked, used = [], {}
        for index in indices:
            views = used.setdefault(index, self.rng.sample(range(self.views), self.views))
            picked.append(views.pop() if views else self.rng.randrange(self.views))
        rows = (torch.as_tensor(picked), torch.as_tensor(indices))
        return {name: value[rows] for name, value in self.cache.items()}

    def features_of(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._features(rows)

    def plain_train_features(self) -> torch.Tensor:
        return self._plain_features({name: value[0] for name, value in self.cache.items()})

    def validation_features(self, validation: ValidationSet) -> torch.Tensor:
        if validation.name not in self._validation_cache:
            self._validation_cache[validation.name] = self._extract_plain(validation.samples)
        return self._plain_features(self._validation_cache[validation.name])

    def _extract_plain(self, samples: list[ImageRecord]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            arrays = np.stack([self.model.preprocess.to_array(_open(sample)) for sample in chunk])
            for name, value in self._extract(arrays).items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}


class LiveImages:
    """End-to-end training: images are decoded, augmented and passed through the backbone."""

    def __init__(self, model, dataset: ImageDataset, config: dict, device):
        self.model, self.dataset, self.device = model, dataset, device
        self.preprocess = model.preprocess
        self.augment = build_train_transform(config["augment"], self.preprocess,
                                             seed=config["seed"])

    def train_features(self, indices: list[int]) -> torch.Tensor:
        arrays = [self.augment(_open(self.dataset.samples[i])) for i in indices]
        return self.model.extract(torch.from_numpy(np.stack(arrays)).to(self.device))

    def _plain(self, samples: list[ImageRecord], preprocess: Preprocess) -> torch.Tensor:
        self.model.eval()
        return plain_features(self.model, samples, 64, self.device, preprocess).to(self.device)

    def plain_train_features(self) -> torch.Tensor:
        return self._plain(self.dataset.samples, self.preprocess)

    def validation_features(self, validation: ValidationSet) -> torch.Tensor:
        return self._plain(validation.samples, self.model.preprocess)


def _open(sample: ImageRecord):
    return crop_box(load_image(sample.path), sample.box)


def _cache_key(config: dict, tag: str | None = None) -> str:
    """The cache folder of one setting: what changes a cached view, except the images."""
    model = {k: config["model"].get(k) for k in ("backbone", "pooling", "gem_p", "levels")}
    if tag:  # the model's extract_lower caches something else than RetrievalNet's
        model["tag"] = tag
    if config["model"].get("finetune_from_stage") is not None:
        model["cut"] = config["model"]["finetune_from_stage"]
    if config["model"].get("landmark_pretrain"):  # the cached local features depend on it
        model["landmarks"] = config["model"]["landmark_pretrain"]
    inputs = {
        "model": model,
        "augment": config["augment"],
        "cache": {k: v for k, v in config["cache"].items() if k != "dir"},
        "seed": config["seed"],
        "version": 2,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _image_key(sample: ImageRecord) -> str:
    """One image (and box) of a cache folder."""
    text = json.dumps([str(sample.path), sample.box], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _consumer_style(cache: dict, seed: int) -> ConsumerStyle | None:
    if not cache.get("synthetic_fraction") or not cache.get("backgrounds"):
        return None
    return ConsumerStyle(list_backgrounds(cache["backgrounds"]), rng=seed)

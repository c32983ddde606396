"""Training recipes: plain YAML merged over defaults, validated before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vestis.recipe_files import deep_merge, read_recipe

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # "cpu", "cuda" or "auto" (CUDA when present)
    "data": {
        # Each source: kind (luma | clothing | csv), path, split_by (a column, "product",
        # "sender_id" or null), val_fraction, and instances: "labels" (use the label column)
        # or "self" (every photo is its own instance; augmented views are its positives).
        # validation_only: true scores the source's held-out part without training on it.
        "sources": [],
        "max_images": None,  # cap on every source (with any per-source cap), for smoke runs
        # k-fold: with folds: K, every split source holds out part `fold` (0..K-1) of its
        # split groups instead of val_fraction; the K runs of one seed hold out every product
        # (every contributor) once (bench/kfold.py).
        "folds": None,
        "fold": 0,
    },
    "model": {
        "architecture": "retrieval_net",
        "backbone": "lite0",
        "pooling": "gem",
        "levels": ["head"],
        "adapter_dim": None,
        "embed_dim": 256,
        "freeze_backbone": True,
        # With a frozen backbone, fine-tune its stages from this one (1-7; 7 is the head
        # convolution alone) on cached lower-stage maps. null trains the head only.
        "finetune_from_stage": None,
    },
    # Only the name: a recipe's loss takes its own parameters (and their defaults), never
    # another loss's (losses refuse keys they do not take).
    "loss": {"name": "triplet"},
    # balance_sources: each data source gets an equal share of a batch's labels, however
    # many labels it has (else labels are drawn uniformly).
    "sampler": {"p": 16, "k": 4, "hard_negative_fraction": 0.25, "balance_sources": False},
    # backbone_lr_scale multiplies the rate of backbone weights (fine-tuned stages).
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "backbone_lr_scale": 0.1},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
    "augment": {
        "crop_scale": [0.6, 1.0],
        "flip": 0.5,
        "rotate": 10,
        "perspective": 0.1,
        "blur": 0.2,
        "brightness": 0.2,
        "contrast": 0.2,
    },
    # With a frozen backbone, features of `views` augmented copies of each training image are
    # computed once and cached; `synthetic_fraction` of them are consumer-style syntheses.
    # `dir` keeps the cache on disk, keyed by everything that shapes it, for later runs.
    "cache": {"views": 6, "synthetic_fraction": 0.0, "backgrounds": None, "dir": None},
    "epochs": 20,
    "time_budget_minutes": 60,
    "batch_size_eval": 64,
}

KNOWN_SOURCE_KINDS = ("luma", "clothing", "csv")
#: Keys a recipe may set, per section (the model section depends on the architecture).
SECTION_KEYS: dict[str, frozenset[str]] = {
    "data": frozenset({"sources", "max_images", "folds", "fold"}),
    "sampler": frozenset({"p", "k", "hard_negative_fraction", "balance_sources",
                          "batches_per_epoch"}),
    "optimizer": frozenset({"name", "lr", "weight_decay", "backbone_lr_scale"}),
    "schedule": frozenset({"name", "warmup_epochs"}),
    "augment": frozenset({"crop_scale", "crop_ratio", "scale", "flip", "rotate", "perspective",
                          "blur", "brightness", "contrast"}),
    "cache": frozenset({"views", "synthetic_fraction", "backgrounds", "dir"}),
}
SOURCE_KEYS = frozenset({"name", "kind", "path", "split_by", "val_fraction", "instances",
                         "validation_only", "max_images", "label_column", "category_column",
                         "group_column", "extra_columns"})


def load_config(source: str | Path | dict, overrides: dict | None = None) -> dict[str, Any]:
    """The recipe merged over :data:`DEFAULTS`; data paths resolved to absolute paths."""
    if isinstance(source, dict):
        raw, base_dir = source, Path.cwd()
    else:
        path = Path(source)
        raw = read_recipe(path)
        base_dir = path.resolve().parent
    if raw.get("task", "retrieval") != "retrieval":
        raise ValueError(f"a recipe of task {raw['task']!r} is not a retrieval recipe: "
                         "train it with vestis train")
    raw = {key: value for key, value in raw.items() if key != "task"}  # the default task
    config = deep_merge(DEFAULTS, raw)
    if overrides:
        config = deep_merge(config, overrides)
    validate(config)
    for source_config in config["data"]["sources"]:
        source_config["path"] = str(resolve_path(source_config["path"], base_dir))
    for stage in ("attention_pretrain", "landmark_pretrain"):
        pretrain = config["model"].get(stage)
        if isinstance(pretrain, dict) and pretrain.get("masks"):
            pretrain["masks"] = str(resolve_path(pretrain["masks"], base_dir))
    if config["cache"].get("dir"):
        config["cache"]["dir"] = str(Path(config["cache"]["dir"]).expanduser().resolve())
    backgrounds = config["cache"].get("backgrounds")
    if backgrounds:
        config["cache"]["backgrounds"] = str(resolve_path(backgrounds, base_dir))
    return config


def resolve_path(value: str, base_dir: Path) -> Path:
    """Relative paths: against the working directory, else the recipe's folder or its parent."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    for root in (Path.cwd(), base_dir, base_dir.parent):
        if (root / path).exists():
            return (root / path).resolve()
    raise FileNotFoundError(f"{value}: not found (relative to {Path.cwd()} or {base_dir})")


def check_keys(config: dict[str, Any]) -> None:
    """Refuse a misspelled or unknown key, naming it, before any work starts."""
    from vestis.losses.registry import check_parameters

    _refuse(set(config) - set(DEFAULTS), "recipe")
    for section, known in SECTION_KEYS.items():
        _refuse(set(config[section]) - known, section)
    for source in config["data"]["sources"]:
        _refuse(set(source) - SOURCE_KEYS, "data source")
    params = dict(config["loss"])
    check_parameters(params.pop("name", None), params)


def _refuse(unknown: set[str], where: str) -> None:
    if unknown:
        raise ValueError(f"unknown {where} key(s): {', '.join(sorted(unknown))}")


def validate(config: dict[str, Any]) -> None:
    check_keys(config)
    sources = config["data"]["sources"]
    if not sources:
        raise ValueError("data.sources is empty: name at least one training source")
    for source in sources:
        if source.get("kind") not in KNOWN_SOURCE_KINDS:
            raise ValueError(f"data source kind must be one of {KNOWN_SOURCE_KINDS}: {source}")
        if "path" not in source:
            raise ValueError(f"data source has no path: {source}")
        if source.get("instances", "labels") not in ("labels", "self"):
            raise ValueError(f"instances must be 'labels' or 'self': {source}")
        if source.get("validation_only") and not source.get("split_by"):
            raise ValueError(f"a validation_only source needs split_by: {source}")
    folds, fold = config["data"]["folds"], config["data"]["fold"]
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise ValueError(f"data.folds must be null or an integer of at least 2, got {folds!r}")
    if folds is not None and (not isinstance(fold, int) or not 0 <= fold < folds):
        raise ValueError(f"data.fold must be an integer from 0 to {folds - 1}, got {fold!r}")
    if all(source.get("validation_only") for source in sources):
        raise ValueError("every data source is validation_only: nothing to train on")
    if config["epochs"] < 1:
        raise ValueError("epochs must be at least 1")
    if config["sampler"]["p"] < 2 or config["sampler"]["k"] < 2:
        raise ValueError("sampler.p and sampler.k must be at least 2")
    from vestis.train.attention_pretrain import pretrain_spec

    for stage in ("attention_pretrain", "landmark_pretrain"):
        pretrain_spec(config["model"].get(stage), stage)
    cut = config["model"].get("finetune_from_stage")
    if cut is not None and (not isinstance(cut, int) or not 1 <= cut <= 7):
        raise ValueError("model.finetune_from_stage must be null or a stage index 1-7")
    test_size = config["model"].get("test_size")
    if test_size is not None and (not isinstance(test_size, int) or test_size < 32):
        raise ValueError("model.test_size must be null or an input size of at least 32 pixels")
    if config["optimizer"]["name"] not in ("adamw", "sgd"):
        raise ValueError("optimizer.name must be adamw or sgd")
    if config["schedule"]["name"] not in ("cosine", "constant"):
        raise ValueError("schedule.name must be cosine or constant")

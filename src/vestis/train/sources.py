"""Turn a recipe's data sources into one training set and per-source validation sets."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vestis.data import read_clothing, read_luma, read_training_csv, split_by_group
from vestis.records import ImageRecord


@dataclass
class ValidationSet:
    """Held-out images of one source, evaluated leave-one-out on their own labels."""

    name: str
    samples: list[ImageRecord]


def read_source_samples(source: dict[str, Any]) -> list[ImageRecord]:
    kind, path = source["kind"], Path(source["path"])
    if kind == "luma":
        return read_luma(path)
    if kind == "clothing":
        return read_clothing(path)
    return read_training_csv(
        path,
        label_column=source.get("label_column", "item_id"),
        category_column=source.get("category_column"),
        group_column=source.get("group_column"),
        extra_columns=tuple(source.get("extra_columns", ())),
    )


def split_key(split_by: str):
    if split_by in ("group", "product"):
        return lambda sample: sample.group or sample.item_id
    if split_by == "label":
        return lambda sample: sample.item_id
    return lambda sample: sample.metadata.get(split_by, sample.item_id)


def subsample(
    samples: list[ImageRecord], limit: int | None, seed: int, key
) -> list[ImageRecord]:
    """About ``limit`` samples, keeping whole split groups (a product, a contributor) together."""
    if not limit or len(samples) <= limit:
        return samples
    groups: dict[str, list[ImageRecord]] = {}
    for sample in samples:
        groups.setdefault(key(sample), []).append(sample)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    chosen: list[ImageRecord] = []
    for key in keys:
        if len(chosen) >= limit:
            break
        chosen.extend(groups[key])
    return chosen


def build_sources(
    config: dict[str, Any],
) -> tuple[list[ImageRecord], list[ValidationSet]]:
    """Training samples of all sources (labels namespaced by source) and validation sets."""
    train, validation = [], []
    seed = config["seed"]
    for source in config["data"]["sources"]:
        name = source.get("name", source["kind"])
        limits = [source.get("max_images"), config["data"]["max_images"]]
        limit = min((value for value in limits if value), default=None)
        split_by = source.get("split_by")
        key = split_key(split_by) if split_by else (lambda sample: str(sample.path))
        samples = subsample(read_source_samples(source), limit, seed, key)
        if split_by:
            train_part, val_part = split_by_group(
                samples, key, source.get("val_fraction", 0.2), seed,
                fold=config["data"]["fold"], folds=config["data"]["folds"],
            )
            validation.append(ValidationSet(name, val_part))
        else:
            train_part = samples
        if source.get("validation_only"):
            continue  # scored on its held-out part, never trained on (unsupervised recipes)
        self_instances = source.get("instances", "labels") == "self"
        train.extend(_namespaced(sample, name, self_instances) for sample in train_part)
    return train, validation


def _namespaced(sample: ImageRecord, name: str, self_instance: bool) -> ImageRecord:
    label = f"{name}:{sample.path}" if self_instance else f"{name}:{sample.item_id}"
    category = f"{name}:{sample.category}" if sample.category is not None else None
    group = f"{name}:{sample.group}" if sample.group is not None else None
    return replace(sample, item_id=label, category=category, group=group)

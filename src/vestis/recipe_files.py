"""Reading YAML recipes: shared by every training task (``vestis train RECIPE``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over a copy of ``base``; nested mappings merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_recipe(path: str | Path) -> dict:
    """The YAML mapping in ``path``; a clear error for a missing file or another YAML type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    return recipe


def refuse_unknown_keys(recipe: Mapping[str, Any], known: Mapping[str, Any],
                        where: str = "recipe") -> None:
    """Refuse a key of ``recipe`` that ``known`` (the recipe kind's defaults) lacks, naming
    it, before any work starts. Nested mappings are checked key by key wherever ``known``
    holds a mapping too (a ``None`` default takes any value)."""
    unknown = sorted(set(recipe) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} key(s): {', '.join(map(str, unknown))}")
    for key, value in recipe.items():
        if isinstance(value, Mapping) and isinstance(known[key], Mapping):
            refuse_unknown_keys(value, known[key], key if where == "recipe" else f"{where}.{key}")


def require_paths(section: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Refuse a recipe that leaves a data path of ``keys`` unset (library defaults name no
    data folder: recipes and command-line arguments do)."""
    missing = [key for key in keys if not section.get(key)]
    if missing:
        raise ValueError(f"the recipe sets no {', '.join(f'{where}.{k}' for k in missing)}")

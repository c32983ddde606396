"""ImageNet-1k class names, in the order of the classifier's outputs."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def imagenet_classes() -> tuple[str, ...]:
    text = (Path(__file__).with_name("imagenet_classes.txt")).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)

"""The smoke budget every recipe's end-to-end test trains on (about a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE = {
    "data": {"max_images": 48},
    "cache": {"views": 2, "dir": None},
    "sampler": {"p": 4, "k": 2},
    "epochs": 2,
    "time_budget_minutes": 2,
}


def smoke(max_images: int = 48, batches_per_epoch: int | None = None) -> dict:
    """:data:`SMOKE` with fewer images or a fixed number of batches per epoch."""
    sampler = {**SMOKE["sampler"], "batches_per_epoch": batches_per_epoch}
    return {**SMOKE, "data": {"max_images": max_images}, "sampler": sampler}

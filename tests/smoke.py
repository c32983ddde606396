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


def smoke_log_rows(recipe: str, out: Path, overrides: dict | None = None) -> list[dict[str, str]]:
    """Train ``configs/<recipe>.yaml`` on the smoke budget into ``out``; the rows of its
    ``log.csv``, after checking that both smoke epochs ran."""
    import csv

    from vestis.train import train

    result = train(CONFIGS / f"{recipe}.yaml", out, overrides=overrides or SMOKE, progress=False)
    assert result.epochs_run == 2
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    return rows

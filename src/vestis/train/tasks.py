"""``vestis train RECIPE``: one command for every training task, dispatched on the recipe's
``task`` key (``retrieval`` when absent).

Invariants: a run writes only into its ``out`` folder (default ``runs/<recipe stem>``), never
into the package; shipping a run is the separate, explicit ``vestis ship RUN NAME``. Each
task's recipe is typed (an unknown key is refused, naming it, before any work starts), and
an option that does not apply to the task (``--resume`` for a parser) is refused too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vestis.recipe_files import read_recipe

#: The training tasks, as a recipe's ``task`` names them; the artifact kinds of
#: :mod:`vestis.artifacts` are the same words.
TASKS = ("retrieval", "parser", "text", "attributes", "outfits", "video-fusion", "rerank")
#: The command-line options each task takes (``epochs``, ``minutes``, ``resume``).
OPTIONS: dict[str, tuple[str, ...]] = {
    "retrieval": ("epochs", "minutes", "resume"),
    "parser": ("epochs",),
    "text": (),
    "attributes": ("epochs",),
    "outfits": ("epochs",),
    "video-fusion": ("epochs",),
    "rerank": ("epochs",),
}


@dataclass(frozen=True)
class TrainSummary:
    """What a run wrote: its task, the checkpoint ``vestis ship`` would store, and a line
    for the user."""

    task: str
    checkpoint: Path
    message: str


def recipe_task(recipe: Mapping[str, Any]) -> str:
    """The recipe's task; a ``ValueError`` naming the known tasks for any other."""
    task = recipe.get("task", "retrieval")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    return task


def default_out(recipe: str | Path) -> Path:
    return Path("runs") / Path(recipe).stem


def train_recipe(recipe: str | Path, out: str | Path | None = None, *, task: str | None = None,
                 epochs: int | None = None, minutes: float | None = None,
                 resume: bool = False) -> TrainSummary:
    """Train ``recipe`` into ``out`` (default ``runs/<recipe stem>``). ``task``, when given,
    must be the recipe's (the ``vestis train-parser`` alias passes ``parser``)."""
    raw = read_recipe(recipe)
    found = recipe_task(raw)
    if task is not None and found != task and "task" in raw:
        raise ValueError(f"{recipe} is a {found} recipe, not a {task} one")
    task = task or found
    given = {"epochs": epochs, "minutes": minutes, "resume": resume or None}
    refused = [name for name, value in given.items()
               if value is not None and name not in OPTIONS[task]]
    if refused:
        raise ValueError(f"--{', --'.join(refused)} does not apply to a {task} recipe")
    out = Path(out) if out is not None else default_out(recipe)
    return _RUNNERS[task](Path(recipe), out, epochs, minutes, resume, task)


def _retrieval(recipe: Path, out: Path, epochs, minutes, resume, task) -> TrainSummary:
    from vestis.train.trainer import train

    overrides: dict = {}
    if epochs is not None:
        overrides["epochs"] = epochs
    if minutes is not None:
        overrides["time_budget_minutes"] = minutes
    result = train(recipe, out, resume=resume, overrides=overrides)
    return TrainSummary(task, result.best_path, (
        f"trained {result.epochs_run} epochs in {result.seconds / 60:.1f} min; "
        f"best checkpoint {result.best_path} (score {result.best_score:.4f})"))


def _parser(recipe: Path, out: Path, epochs, minutes, resume, task) -> TrainSummary:
    from vestis.detect.train import train_parser

    result = train_parser(recipe, out, {"train": {"epochs": epochs}} if epochs is not None else {})
    return TrainSummary(task, result.checkpoint, (
        f"trained {result.epochs} epochs in {result.seconds / 60:.1f} min; checkpoint "
        f"{result.checkpoint} (validation mIoU {result.val_miou:.4f} at the training "
        f"resolution; vestis eval-parsing {out / 'val.csv'} --parser {result.checkpoint} "
        "for the full-resolution figures)"))


def _heads(recipe: Path, out: Path, epochs, minutes, resume, task) -> TrainSummary:
    from vestis.train.heads import train_heads

    heads = train_heads(recipe, out, {"epochs": epochs} if epochs is not None else {})
    return TrainSummary(task, heads.path, (
        f"trained in {heads.seconds:.0f} s; wrote {heads.path}; held-out metrics in "
        f"{out / 'metrics.json'}"))


def _text(recipe: Path, out: Path, epochs, minutes, resume, task) -> TrainSummary:
    from vestis.text.align import RUN_FILE, train_from_recipe

    trained = train_from_recipe(recipe, out)
    info = ", ".join(f"{key} {value}" for key, value in trained.info.items())
    return TrainSummary(task, out / RUN_FILE, (
        f"trained the text head for {trained.model_id} ({info}); wrote {out / RUN_FILE}"))


def _fusion(recipe: Path, out: Path, epochs, minutes, resume, task) -> TrainSummary:
    from vestis.video.fusion import RUN_FILE, train_from_recipe

    train_from_recipe(recipe, out, {"epochs": epochs} if epochs is not None else {})
    return TrainSummary(task, out / RUN_FILE, f"wrote {out / RUN_FILE}")


def _rerank(recipe: Path, out: Path, epochs, minutes, resume, task) -> TrainSummary:
    from vestis.train.rerank import RUN_FILE, train_from_recipe

    summary = train_from_recipe(recipe, out, {"epochs": epochs} if epochs is not None else {})
    return TrainSummary(task, out / RUN_FILE, f"{summary}; wrote {out / RUN_FILE}")


_RUNNERS: dict[str, Callable[..., TrainSummary]] = {
    "retrieval": _retrieval, "parser": _parser, "text": _text,
    "attributes": _heads, "outfits": _heads, "video-fusion": _fusion, "rerank": _rerank,
}

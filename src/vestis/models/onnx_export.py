"""Export a model to ONNX: the same L2-normalised vector as :class:`vestis.models.Encoder`.

The graph takes a preprocessed float32 batch ``images`` (N, 3, S, S), N free, and returns
``vectors`` (N, D), L2-normalised. The file carries what an encoder needs without torch:
``vestis_model_name``, ``vestis_model_id``, ``vestis_dim`` and ``vestis_preprocess`` (JSON).
GeM pooling (``clamp(min=eps) ** p``, mean, ``** 1/p``) exports as Clip/Pow/ReduceMean.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vestis import atomic
from vestis.images import Preprocess
from vestis.models.hooks import ModelHooks

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "vectors"
#: Lowest cosine between torch and ONNX Runtime vectors that an export must reach.
MIN_AGREEMENT = 0.999


class NormalisedModel(nn.Module):
    """``model`` followed by the L2 normalisation that :class:`Encoder` applies."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images).float(), dim=-1)


def model_metadata(model: ModelHooks) -> dict[str, str]:
    """The facts about ``model`` written into its ONNX file."""
    name = str(model.display_name)
    dim = int(model.output_dim)
    return {
        "vestis_model_name": name,
        "vestis_model_id": str(model.model_id or name),
        "vestis_dim": str(dim),
        "vestis_preprocess": json.dumps(model.preprocess.to_dict()),
    }


def export_onnx(model: nn.Module, out: str | Path | None = None, *, opset: int = OPSET) -> bytes:
    """Export ``model`` (in eval mode, on the CPU) and return the ONNX bytes.

    With ``out`` the file is also written there, atomically.
    """
    import onnx

    model = model.eval().cpu()
    size = model.preprocess.size
    dummy = torch.zeros(2, 3, size, size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: shapes are fixed
        torch.onnx.export(
            NormalisedModel(model), (dummy,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in model_metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    if out is not None:
        write_atomic(Path(out), data)
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write *data* to *path* atomically (:func:`vestis.atomic.write_atomic`), creating its
    folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_atomic(path, data)


def read_metadata(data: bytes | str | Path) -> tuple[dict[str, str], Preprocess]:
    """The vestis metadata and preprocessing stored in an exported ONNX model."""
    import onnxruntime as ort

    source = data if isinstance(data, bytes) else str(data)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if "vestis_preprocess" not in meta:
        raise ValueError(f"{describe(data)}: not an ONNX model exported by vestis")
    return meta, Preprocess.from_dict(json.loads(meta["vestis_preprocess"]))


def describe(data: bytes | str | Path) -> str:
    return f"<{len(data)} bytes of ONNX>" if isinstance(data, bytes) else str(data)


def fingerprint(model: ModelHooks, opset: int = OPSET) -> str:
    """A digest of everything the exported graph depends on: weights, config, exporter."""
    digest = hashlib.sha256()
    header = {**model_metadata(model), "class": type(model).__qualname__, "opset": opset,
              "check": 2,  # exports from before the batch-size check are not reused
              "torch": torch.__version__, "config": repr(model.config)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where exported models are cached: ``$VESTIS_CACHE_DIR`` or ``~/.cache/vestis``."""
    root = os.environ.get("VESTIS_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vestis" / "onnx"


def agreement(model: nn.Module, run_onnx, seed: int = 0) -> float:
    """Lowest cosine between torch and ``run_onnx`` vectors over seeded random batches.

    Batches of 1 and 3 rows catch exports whose shapes were traced into the graph."""
    size = model.preprocess.size
    rng = np.random.default_rng(seed)
    lowest = 1.0
    for rows in (1, 3):
        batch = rng.standard_normal((rows, 3, size, size)).astype(np.float32)
        with torch.inference_mode():
            expected = NormalisedModel(model.eval().cpu())(torch.from_numpy(batch)).numpy()
        try:
            got = run_onnx(batch)
        except Exception as exc:  # ONNX Runtime fails on a shape the export fixed
            raise RuntimeError(f"the ONNX export fails on a batch of {rows}: {exc}") from exc
        lowest = min(lowest, float(np.min(np.sum(expected * got, axis=1))))
    return lowest

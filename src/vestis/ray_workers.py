"""What the Ray ingest runs on its workers (:mod:`vestis.catalog.ray_ingest` drives it).

Kept out of :mod:`vestis.catalog` so that a Ray worker process imports PIL, numpy and
ONNX Runtime only, not the catalog's torch and FAISS (seconds per process on a small
machine). Each function is the plain ingest's own step on one encoder batch: the content
hash (:func:`vestis.images.file_digest`), the model's :class:`vestis.images.Preprocess`,
and its ONNX Runtime session built from the same model bytes (torch only when the model
has no ONNX export, or on a GPU).

A batch travels as one row: ``start`` (its first position in the ingest) and ``items``,
JSON ``[[path or URI, box or null], ...]``; pixels and vectors travel as raw float32 bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vestis.images import Box, ImageError, Preprocess, file_digest, is_uri


def batch_row(start: int, sources: list, boxes: list) -> dict[str, Any]:
    items = [[str(source), list(box) if box is not None else None]
             for source, box in zip(sources, boxes, strict=True)]
    return {"start": start, "items": json.dumps(items)}


def row_items(row: dict[str, Any]) -> list[tuple[Path | str, Box | None]]:
    return [(path if is_uri(path) else Path(path), tuple(box) if box is not None else None)
            for path, box in json.loads(row["items"])]


def hash_batch(row: dict[str, Any]) -> dict[str, Any]:
    """``digests``: JSON ``[[sha or null, reason or null], ...]`` of the batch's files."""
    digests = [file_digest(path, box) for path, box in row_items(row)]
    return {"start": row["start"], "digests": json.dumps(digests)}


def decode_batch(row: dict[str, Any], preprocess: dict) -> dict[str, Any]:
    """The pixels of a batch's good images (as :meth:`Encoder.iter_batches` prepares them),
    their offsets, and each bad image's offset and reason."""
    prepare = Preprocess.from_dict(preprocess)
    arrays, good, errors = [], [], []
    for offset, (path, box) in enumerate(row_items(row)):
        try:
            arrays.append(prepare(path, box))
            good.append(offset)
        except ImageError as exc:
            errors.append((offset, exc.reason))
    pixels = np.stack(arrays).astype(np.float32, copy=False) if arrays else np.zeros(0, np.float32)
    return {"start": row["start"], "pixels": pixels.tobytes(), "good": json.dumps(good),
            "errors": json.dumps(errors)}


class EmbedActor:
    """Holds one model and embeds batches: ``onnx`` (the driver's ONNX model bytes, with
    its input and output names) on one ONNX Runtime thread, else the model ``name`` through
    :class:`vestis.models.Encoder` (torch, on ``device``).

    With ``preprocess`` the actor decodes each batch itself (:func:`decode_batch`) before
    embedding it: on CPU workers that is cheaper than a separate decoding stage, whose
    pixels (12 MB a batch at 256 px) would travel through Ray's object store, and it keeps
    each actor on the one core Ray gave it. Without, it takes rows :func:`decode_batch`
    made elsewhere (GPU actors, fed by CPU tasks)."""

    def __init__(self, *, onnx: tuple[bytes, str, str] | None, name: str, model_id: str,
                 size: int, dim: int, backend: str = "auto", device: str | None = None,
                 preprocess: dict | None = None):
        self.size, self.dim = size, dim
        self.preprocess = preprocess
        if onnx is not None:
            from vestis.onnx_session import cpu_session

            model, input_name, output_name = onnx
            session = cpu_session(model, threads=1)

            def run(batch: np.ndarray) -> np.ndarray:
                return session.run([output_name], {input_name: batch})[0]

            self.embed = run
        else:
            from vestis.models import Encoder

            options: dict[str, Any] = {"backend": backend, "device": device}
            if device is None:
                options.update(threads=1, streams=1, workers=1)
            encoder = Encoder.from_name(name, **options)
            if encoder.model_id != model_id:  # vectors of two models must never mix
                raise ValueError(f"{name} loads as model {encoder.model_id!r} on a Ray "
                                         f"worker, not the catalog's {model_id!r}")
            self.embed = encoder.embed_arrays

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.preprocess is not None:
            row = decode_batch(row, self.preprocess)
        good = json.loads(row["good"])
        if good:
            pixels = np.frombuffer(row["pixels"], dtype=np.float32)
            vectors = self.embed(pixels.reshape(len(good), 3, self.size, self.size))
        else:
            vectors = np.zeros((0, self.dim), np.float32)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(good), self.dim):
            raise ValueError(f"the model gave vectors of shape {vectors.shape}, "
                             f"not ({len(good)}, {self.dim})")
        return {"start": row["start"], "good": row["good"], "errors": row["errors"],
                "vectors": vectors.tobytes()}

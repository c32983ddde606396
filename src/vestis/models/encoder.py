"""Turn images into L2-normalised embeddings, in batches, deterministically.

Inference runs on ONNX Runtime when it is installed (``backend="auto"``), else torch eager;
see :mod:`vestis.models.backends`. An ONNX file written by ``vestis export`` is itself a
model name: it embeds without torch weights.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vestis.defaults import BATCH_SIZE
from vestis.images import Box, ImageError, ImageSource, Preprocess
from vestis.models.backends import Backend, OnnxBackend, create_backend, physical_cores
from vestis.models.hooks import ModelHooks
from vestis.models.registry import create_model

#: Fewest decoding threads an encoder runs: even on one core, decoding the next batch while
#: the current one runs overlaps I/O and decompression with inference.
MIN_DECODE_WORKERS = 2


def batch_span(count: int, batch_size: int, streams: int) -> int:
    """Images per inference batch for ``count`` images: ``batch_size``, or fewer when that
    would leave inference streams idle (a query's few garments then run on every core,
    not one; the backends give each image the same vector whatever its batch)."""
    return max(1, min(batch_size, math.ceil(count / streams)))


class BadImagesError(ImageError):
    """Several images could not be used: ``errors`` holds each one's ImageError; the
    message lists them, one per line."""

    def __init__(self, errors: Sequence[ImageError]):
        ValueError.__init__(self, f"{len(errors)} images could not be used:\n"
                            + "\n".join(f"  {error}" for error in errors))
        self.errors = list(errors)
        self.source = errors[0].source
        others = "; ".join(str(error) for error in errors[1:])
        self.reason = f"{errors[0].reason} (and {len(errors) - 1} more: {others})"


@dataclass
class EncodedBatch:
    """Vectors for the good images of one batch, and the errors of the bad ones."""

    indices: list[int]
    vectors: np.ndarray
    errors: list[tuple[int, ImageError]] = field(default_factory=list)


class Encoder:
    """Embeds images with a model from the registry.

    Decoding and preprocessing run in a pool of ``workers`` threads, overlapped with
    inference; ONNX Runtime runs ``streams`` batches at once (one per physical core, one
    intra-op thread each: see :func:`vestis.models.backends.create_backend`).
    Output rows are float32 and L2-normalised; the same input always gives the same row.
    ``backend`` is ``auto`` (ONNX Runtime when installed, on a CPU), ``onnx`` or ``torch``.
    """

    def __init__(
        self,
        model: ModelHooks | str,
        *,
        batch_size: int = BATCH_SIZE,
        device: str | None = None,
        workers: int | None = None,
        backend: str = "auto",
        threads: int | None = None,
        streams: int | None = None,
    ):
        model = create_model(model) if isinstance(model, str) else model.eval()
        self.model: nn.Module | None = model
        self.device = torch.device(device or "cpu")
        identity = (
            model.display_name,
            model.model_id,
            int(model.output_dim),
        )
        self._setup(create_backend(model, backend, device=device, threads=threads,
                                   streams=streams),
                    model.preprocess, identity, batch_size, workers)

    def _setup(self, backend: Backend, preprocess: Preprocess, identity: tuple,
               batch_size: int, workers: int | None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.preprocess = preprocess
        self._identity = identity
        self.batch_size = batch_size
        # Decoding threads overlap inference; PIL releases the GIL while it decodes.
        self.workers = workers or max(MIN_DECODE_WORKERS, physical_cores())

    @classmethod
    def from_name(cls, name: str, **kwargs) -> Encoder:
        """A registered model, a checkpoint path, or an ONNX file from ``vestis export``."""
        if str(name).endswith(".onnx"):
            return cls.from_onnx(name, **kwargs)
        return cls(create_model(name), **kwargs)

    @classmethod
    def from_onnx(
        cls, path: str | Path, *, batch_size: int = BATCH_SIZE, workers: int | None = None,
        threads: int | None = None, streams: int | None = None, backend: str = "onnx",
        device: str | None = None,
    ) -> Encoder:
        """An ONNX Runtime encoder from an exported file alone (no torch weights)."""
        from vestis.models.onnx_export import read_metadata

        if backend not in ("auto", "onnx") or (device or "cpu") != "cpu":
            raise ValueError(f"{path}: an ONNX file runs on ONNX Runtime, on the CPU")
        meta, preprocess = read_metadata(path)
        encoder = cls.__new__(cls)
        encoder.model = None
        encoder.device = torch.device("cpu")
        identity = (meta["vestis_model_name"], meta["vestis_model_id"], int(meta["vestis_dim"]))
        backend_ = OnnxBackend(path, threads=threads, streams=streams)
        encoder._setup(backend_, preprocess, identity, batch_size, workers)
        return encoder

    @property
    def name(self) -> str:
        return self._identity[0]

    @property
    def model_id(self) -> str:
        """Identifies the weights: vectors of different model ids must never be mixed."""
        return self._identity[1] or self.name

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def dim(self) -> int:
        return self._identity[2]

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Embed an already preprocessed (N, 3, S, S) float32 batch."""
        return self.backend(np.ascontiguousarray(batch, dtype=np.float32))

    def embed(
        self,
        sources: Sequence[ImageSource],
        boxes: Sequence[Box | None] | None = None,
        *,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed every source. Bad images do not stop it: once all are read, one bad image
        raises its :class:`ImageError`, several raise :class:`BadImagesError` listing every
        one (so ``vestis eval`` names all the bad files of a dataset at once)."""
        out = np.zeros((len(sources), self.dim), dtype=np.float32)
        errors: list[ImageError] = []
        for batch in self.iter_batches(sources, boxes, progress=progress):
            errors += [error for _, error in batch.errors]
            out[batch.indices] = batch.vectors
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise BadImagesError(errors)
        return out

    def embed_one(self, source: ImageSource, box: Box | None = None) -> np.ndarray:
        return self.embed([source], [box])[0]

    def iter_batches(
        self,
        sources: Sequence[ImageSource],
        boxes: Sequence[Box | None] | None = None,
        *,
        progress: bool = False,
        desc: str = "embedding",
    ) -> Iterator[EncodedBatch]:
        """Yield batches in input order; bad images are reported, never raised."""
        if boxes is not None and len(boxes) != len(sources):
            raise ValueError(f"{len(boxes)} boxes for {len(sources)} images")
        boxes = boxes if boxes is not None else [None] * len(sources)
        bar = tqdm(total=len(sources), desc=desc, unit="img", disable=not progress)
        streams = max(1, self.backend.streams)
        size = batch_span(len(sources), self.batch_size, streams)
        with ThreadPoolExecutor(self.workers) as decoders, ThreadPoolExecutor(streams) as runners:
            in_flight: deque[Future] = deque()
            for start in range(0, len(sources), size):
                decoded = self._submit(decoders, sources, boxes, start, size)
                in_flight.append(runners.submit(self._finish, start, decoded))
                # Keep one batch decoding ahead of every inference stream.
                if len(in_flight) > streams:
                    yield self._report(in_flight.popleft().result(), bar)
            while in_flight:
                yield self._report(in_flight.popleft().result(), bar)
        bar.close()

    @staticmethod
    def _report(batch: EncodedBatch, bar) -> EncodedBatch:
        bar.update(len(batch.indices) + len(batch.errors))
        return batch

    def _submit(self, pool, sources, boxes, start: int, size: int) -> list[Future]:
        stop = min(start + size, len(sources))
        return [pool.submit(self.preprocess, sources[i], boxes[i]) for i in range(start, stop)]

    def _finish(self, start: int, futures: list[Future]) -> EncodedBatch:
        arrays, indices, errors = [], [], []
        for offset, future in enumerate(futures):
            try:
                arrays.append(future.result())
                indices.append(start + offset)
            except ImageError as exc:
                errors.append((start + offset, exc))
        if arrays:
            vectors = self.embed_arrays(np.stack(arrays))
        else:
            vectors = np.zeros((0, self.dim), np.float32)
        return EncodedBatch(indices, vectors, errors)

"""Turn images into L2-normalised embeddings, in batches, deterministically."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vestis.images import Box, ImageError, ImageSource
from vestis.models.registry import create_model


@dataclass
class EncodedBatch:
    """Vectors for the good images of one batch, and the errors of the bad ones."""

    indices: list[int]
    vectors: np.ndarray
    errors: list[tuple[int, ImageError]] = field(default_factory=list)


class Encoder:
    """Embeds images with a model from the registry.

    Decoding and preprocessing run in a thread pool, overlapped with inference.
    Output rows are float32 and L2-normalised; the same input always gives the same row.
    """

    def __init__(
        self,
        model: nn.Module | str,
        *,
        batch_size: int = 32,
        device: str | None = None,
        workers: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = create_model(model) if isinstance(model, str) else model.eval()
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        self.batch_size = batch_size
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.preprocess = self.model.preprocess

    @classmethod
    def from_name(cls, name: str, **kwargs) -> Encoder:
        return cls(create_model(name), **kwargs)

    @property
    def name(self) -> str:
        return getattr(self.model, "model_name", type(self.model).__name__)

    @property
    def model_id(self) -> str:
        """Identifies the weights: vectors of different model ids must never be mixed."""
        return getattr(self.model, "model_id", self.name)

    @property
    def dim(self) -> int:
        return int(getattr(self.model, "output_dim", self.model.embed_dim))

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Embed an already preprocessed (N, 3, S, S) float32 batch."""
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device)
            vectors = self.model(tensor).float()
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    def embed(
        self,
        sources: Sequence[ImageSource],
        boxes: Sequence[Box | None] | None = None,
        *,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed every source; raises :class:`ImageError` for the first bad image."""
        out = np.zeros((len(sources), self.dim), dtype=np.float32)
        for batch in self.iter_batches(sources, boxes, progress=progress):
            if batch.errors:
                raise batch.errors[0][1]
            out[batch.indices] = batch.vectors
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
        starts = range(0, len(sources), self.batch_size)
        bar = tqdm(total=len(sources), desc=desc, unit="img", disable=not progress)
        with ThreadPoolExecutor(self.workers) as pool:
            pending = self._submit(pool, sources, boxes, 0)
            for start in starts:
                current = pending
                next_start = start + self.batch_size
                pending = self._submit(pool, sources, boxes, next_start)
                yield self._finish(start, current)
                bar.update(len(current))
        bar.close()

    def _submit(self, pool, sources, boxes, start: int) -> list[Future]:
        stop = min(start + self.batch_size, len(sources))
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

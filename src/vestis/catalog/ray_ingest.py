"""Ingest on Ray Data: hashing as Ray tasks (in the driver's threads when a local Ray reads
local files), decoding and embedding in a pool of actors that
each hold the catalog's model, writes in the driver (``vestis index SOURCE --ray``).

The pipeline is cut into the batches :meth:`vestis.models.Encoder.iter_batches` would make
(``batch_size`` records each, in input order). On CPUs each actor decodes and embeds its own
batches on the one core Ray gives it (so N workers use N cores, and no pixels cross the
object store); with GPUs, CPU tasks decode for the GPU actors. Each batch goes through the same
functions as the plain ingest (:mod:`vestis.ray_workers`): :func:`vestis.images.file_digest`
for the content hash, the model's :class:`vestis.images.Preprocess` for the pixels, and for
the vectors the very ONNX model the driver's encoder runs (its bytes, shipped to the
actors) in a session opened by :func:`vestis.onnx_session.cpu_session` on one thread per
actor. So the vectors are the ones the plain ingest stores, bit for bit, the image ids come
out in the same order, and a bad file gets the same reason. A model without an ONNX export
(``--backend torch``) is loaded by name in each actor instead, and its identity checked.

Everything that writes stays in the driver, in :class:`vestis.catalog.ingest.Indexer`:
the store's write lock, the known-hash check (idempotent re-ingest), the model check on
every batch, one transaction per batch. Ray only computes.

``address``: ``local`` starts a Ray instance on this machine (all its CPUs unless
``num_cpus`` is given) and stops it when done; anything else (``auto``,
``ray://head:10001``) joins an existing cluster, where vestis (and the model, when it is a
checkpoint path) must be installed on every node. With GPUs in the cluster, one actor per
GPU embeds on torch (CUDA): the vectors then agree with the CPU ones to float tolerance,
not bit for bit.

Ray is imported only here, only when ``--ray`` is asked for.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vestis.catalog.ingest import HASH_THREADS, Digest, digest_record
from vestis.images import Box, ImageError, ImageSource, Preprocess, is_uri
from vestis.models import Encoder
from vestis.models.encoder import EncodedBatch
from vestis.ray_workers import EmbedActor, batch_row, decode_batch, hash_batch
from vestis.records import ImageRecord

LOCAL = "local"
#: Blocks of the chunk dataset at most (one chunk is one encoder batch).
MAX_BLOCKS = 10_000


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def require_ray() -> None:
    if not ray_available():
        raise ImportError("--ray needs Ray Data: pip install 'vestis[ray]' "
                          "(or pip install 'ray[data]')")


@dataclass
class RayRunner:
    """Runs an ingest's hashing and embedding on Ray (see the module docstring).

    ``model``: the name the catalog's encoder is loaded by (a registered model, a
    checkpoint or an ONNX file), ``model_id`` the identity every actor's encoder must have.
    ``workers``: embedding actors (default: one per GPU when the cluster has GPUs, else one
    per CPU). Use as a context manager: it starts (and then stops) a local Ray instance when
    ``address`` is ``local`` and none is running in this process.
    """

    model: str
    model_id: str
    dim: int
    preprocess: Preprocess
    onnx: tuple[bytes, str, str] | None = field(default=None, repr=False)
    backend: str = "auto"
    batch_size: int = 16
    address: str = LOCAL
    workers: int | None = None
    num_cpus: int | None = None
    _started: bool = field(default=False, init=False, repr=False)

    @classmethod
    def for_encoder(cls, encoder: Encoder, model: str, **options: Any) -> RayRunner:
        """A runner whose actors load ``model`` and must get ``encoder``'s identity."""
        backend = options.pop("backend", "auto")
        return cls(model=model, model_id=encoder.model_id, dim=encoder.dim,
                   preprocess=encoder.preprocess, onnx=onnx_model(encoder),
                   batch_size=encoder.batch_size, backend=backend, **options)

    # -- life cycle --------------------------------------------------------------------
    def __enter__(self) -> RayRunner:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        require_ray()
        import ray
        from ray.data import DataContext

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per dataset
        if not ray.is_initialized():
            if self.address == LOCAL:
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         logging_level="warning", configure_logging=True,
                         log_to_driver=True)
            else:
                ray.init(address=self.address, logging_level="warning")
            self._started = True
        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # image ids as without Ray
        context.enable_progress_bars = False  # the ingest's own bars say where it is
        context.print_on_execution_start = False

    def stop(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def _resources(self) -> tuple[int, dict[str, Any]]:
        """How many embedding actors, and what each one asks of Ray."""
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus:
            return self.workers or gpus, {"num_gpus": 1, "num_cpus": 1}
        return self.workers or max(1, cpus), {"num_cpus": 1}

    # -- the two stages Indexer asks for -----------------------------------------------
    def digests(self, records: Sequence[ImageRecord]) -> Iterator[Digest]:
        """Each record's content hash (or why it cannot be read), in input order."""
        from ray.data import TaskPoolStrategy

        if not records:
            return
        if self.address == LOCAL and not any(is_uri(r.path) for r in records):
            # The files are on this machine's disk: threads hash them as the plain ingest
            # does, without the start of a Ray dataset (seconds on a small machine).
            with ThreadPoolExecutor(HASH_THREADS) as pool:
                yield from pool.map(digest_record, records)
            return
        workers, _ = self._resources()
        rows = _batch_rows([r.path for r in records], [r.box for r in records], self.batch_size)
        dataset = _dataset(rows).map(hash_batch, num_cpus=0,
                                     compute=TaskPoolStrategy(size=workers))
        for row in dataset.iter_rows():
            start = int(row["start"])
            for offset, (sha, error) in enumerate(json.loads(row["digests"])):
                yield records[start + offset], sha, error

    def iter_batches(self, sources: Sequence[ImageSource], boxes: Sequence[Box | None], *,
                     progress: bool = False, desc: str = "embedding") -> Iterator[EncodedBatch]:
        """The batches :meth:`Encoder.iter_batches` yields for the same input, computed on
        Ray by the actor pool, in input order."""
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        if not sources:
            return
        workers, actor_resources = self._resources()
        on_gpu = "num_gpus" in actor_resources
        preprocess = self.preprocess.to_dict()
        model = {"onnx": None if on_gpu else self.onnx, "name": self.model,
                 "model_id": self.model_id,
                 "size": self.preprocess.size, "dim": self.dim,
                 "backend": "torch" if on_gpu else self.backend,
                 "device": "cuda" if on_gpu else None,
                 "preprocess": None if on_gpu else preprocess}
        dataset = _dataset(_batch_rows(sources, boxes, self.batch_size))
        if on_gpu:  # CPU tasks decode, so that the GPU never waits on JPEG decoding
            dataset = dataset.map(decode_batch, fn_kwargs={"preprocess": preprocess},
                                  num_cpus=1, compute=TaskPoolStrategy(size=workers))
        dataset = dataset.map(EmbedActor, fn_constructor_kwargs=model,
                              compute=ActorPoolStrategy(size=workers), **actor_resources)
        bar = tqdm(total=len(sources), desc=desc, unit="img", disable=not progress)
        for row in dataset.iter_rows():
            batch = self._batch(row, sources)
            bar.update(len(batch.indices) + len(batch.errors))
            yield batch
        bar.close()

    def _batch(self, row: dict[str, Any], sources: Sequence[ImageSource]) -> EncodedBatch:
        start = int(row["start"])
        good = json.loads(row["good"])
        vectors = np.frombuffer(row["vectors"], dtype=np.float32).reshape(len(good), self.dim)
        errors = [(start + offset, ImageError(str(sources[start + offset]), reason))
                  for offset, reason in json.loads(row["errors"])]
        return EncodedBatch([start + offset for offset in good], vectors.copy(), errors)


def _dataset(rows: list[dict[str, Any]]):
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))


def _batch_rows(sources: Sequence, boxes: Sequence, size: int) -> list[dict[str, Any]]:
    """One row per encoder batch (:func:`vestis.ray_workers.batch_row`)."""
    return [batch_row(start, list(sources[start:start + size]), list(boxes[start:start + size]))
            for start in range(0, len(sources), size)]


def onnx_model(encoder: Encoder) -> tuple[bytes, str, str] | None:
    """The bytes of the ONNX model ``encoder`` runs, with its input and output names, or
    None when it runs on torch."""
    from vestis.models import onnx_export
    from vestis.models.backends import OnnxBackend

    backend = encoder.backend
    if not isinstance(backend, OnnxBackend):
        return None
    source = backend.source
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return data, onnx_export.INPUT_NAME, onnx_export.OUTPUT_NAME

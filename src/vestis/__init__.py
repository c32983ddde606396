"""vestis: clothing image retrieval.

The exports below load on first use (PEP 562), so ``import vestis`` and ``vestis --help``
import neither torch, FAISS nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vestis.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from vestis.catalog import Catalog
    from vestis.evaluation import evaluate
    from vestis.images import ImageError, load_image
    from vestis.models import Encoder, create_model, list_models

__version__ = "0.1.0"

#: Lazily exported name -> the module that defines it.
_LAZY = {
    "Catalog": "vestis.catalog",
    "Encoder": "vestis.models",
    "ImageError": "vestis.images",
    "create_model": "vestis.models",
    "evaluate": "vestis.evaluation",
    "list_models": "vestis.models",
    "load_image": "vestis.images",
}

__all__ = [
    "DEFAULT_MODEL",
    "Catalog",
    "Encoder",
    "ImageError",
    "__version__",
    "create_model",
    "evaluate",
    "list_models",
    "load_image",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

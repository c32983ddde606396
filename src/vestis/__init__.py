"""vestis: clothing image retrieval."""

from vestis.catalog import Catalog
from vestis.evaluation import evaluate
from vestis.images import ImageError, load_image
from vestis.models import DEFAULT_MODEL, Encoder, create_model, list_models

__version__ = "0.1.0"

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

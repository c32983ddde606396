"""vestis: clothing image retrieval."""

from vestis.images import ImageError, load_image
from vestis.models import DEFAULT_MODEL, Encoder, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "ImageError",
    "__version__",
    "create_model",
    "list_models",
    "load_image",
]

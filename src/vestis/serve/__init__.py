"""``vestis serve``: an HTTP API and a web page over one catalog."""

from vestis.serve.app import create_app
from vestis.serve.auth import read_token
from vestis.serve.service import CatalogService, ItemExistsError, SearchResult

__all__ = ["CatalogService", "ItemExistsError", "SearchResult", "create_app", "read_token"]

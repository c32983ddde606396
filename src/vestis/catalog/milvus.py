"""The Milvus catalog store: :class:`MilvusStore`, a :class:`~vestis.catalog.backend.CatalogStore`
on a Milvus server (``milvus://HOST:PORT/COLLECTION``) or an embedded Milvus Lite database
(``milvus-lite:PATH``), through the same ``pymilvus`` client code.

Three collections, read through the names ``<name>_images``, ``<name>_items`` and
``<name>_meta``: aliases of one generation's collections (``<name>_g0_images`` … as created;
re-embedding switches them to a new generation, crash-safe: :mod:`vestis.catalog.milvus_switch`;
a catalog created before generations holds plain collections of those names, migrated by its
first re-embedding):

* images: ``id`` (INT64 primary key, never reused: the next id is kept in meta and
  reserved before rows are inserted), ``item_id``, ``item_key``, ``path``, ``sha256``,
  ``box``, ``meta`` (the image's own metadata, JSON), ``filt`` (the filter keys, below) and
  ``vec`` (FLOAT_VECTOR, inner product on the L2-normalised vectors, so scores are the
  embedded store's cosine scores);
* items: ``item_key`` (primary key), ``item_id``, ``meta`` (JSON);
* meta: ``key`` → ``value`` strings (model identity, dim, index choice, id counter,
  generation).

Milvus needs a vector field in every collection: items and meta carry a 2-d zero vector.

Filters are Milvus boolean expressions that never contain user text. ``item_key`` is a
hash of the item id and ``filt`` maps a hash of each metadata key to a hash of the value
the embedded store compares (the image's value, else its item's, as text; booleans as
``1``/``0``), so ``where={"colour": ["red", "navy"]}`` becomes
``(filt["k…"] == "v…" or filt["k…"] == "v…")``: hex digits only, nothing to escape, no
injection through keys or values, and exactly the embedded store's text equality.

A store reads the collections its catalog's names led to when it was opened
(:attr:`MilvusStore.prefix`): once a re-embedding switched the catalog to another generation,
its writes raise :class:`~vestis.catalog.local.CatalogReplacedError` and so do its reads once
the old collections are dropped (the server then opens the catalog again), never the new
vectors searched with the old model.

What Milvus does not do as the embedded store does (README, "Scale"): a write spanning
several rows or collections is not one transaction (a crash can leave an item without its
images, never an image id reused); :meth:`writing` serialises the writers of this process
only; ``generation`` is bumped by each write of a vestis client (read-modify-write), so
with several writing processes it is only as consistent as Milvus itself. A Milvus Lite
file is opened by one process at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vestis.catalog import milvus_switch
from vestis.catalog.backend import ItemHit
from vestis.catalog.index import (
    AUTO,
    HNSW_EF_SEARCH,
    HNSW_M,
    exact_top_k,
    is_sized,
    ivf_lists,
    pq_bytes,
    recall_at_k,
    resolve_factory,
)
from vestis.catalog.local import CatalogReplacedError
from vestis.catalog.store import ImageRow, ModelMismatchError, NewImage, filter_text

LITE_PREFIX = "milvus-lite:"
SERVER_PREFIX = "milvus:"
DEFAULT_NAME = "vestis"
#: Milvus index types a choice may name directly (``--index IVF_SQ8``).
MILVUS_INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN")
HNSW_EF_CONSTRUCTION = 200
#: Index types Milvus Lite (3.x) does not build.
LITE_UNSUPPORTED = ("IVF_PQ", "DISKANN")
PAGE = 4096
#: The most rows one Milvus query returns (its offset + limit window).
MAX_ROWS = 16384
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_ZERO = [0.0, 0.0]
_MAX_PATH = 8192
_MAX_ID = 4096


class MilvusLocation:
    """A parsed Milvus catalog URI: the client's ``uri`` and the collections' name."""

    def __init__(self, location: str):
        text = str(location)
        self.text = text
        if text.startswith(LITE_PREFIX):
            file, _, name = text[len(LITE_PREFIX):].partition("#")
            if not file:
                raise ValueError(f"{text}: milvus-lite:PATH needs a file path")
            self.file: Path | None = Path(file).expanduser().absolute()
            self.uri = str(self.file)
            self.name = name or DEFAULT_NAME
        elif text.startswith(SERVER_PREFIX):
            rest = text[len(SERVER_PREFIX):].lstrip("/")  # a Path turns // into /
            host, _, name = rest.partition("/")
            if not host or not name:
                raise ValueError(f"{text}: a Milvus server catalog is "
                                 "milvus://HOST:PORT/COLLECTION")
            self.file = None
            self.uri = f"http://{host}"
            self.name = name.strip("/")
        else:
            raise ValueError(f"{text}: not a Milvus catalog URI (milvus://HOST:PORT/COLLECTION "
                             "or milvus-lite:PATH)")
        if not _NAME.match(self.name):
            raise ValueError(f"{text}: collection name {self.name!r} must be letters, digits "
                             "and underscores, not starting with a digit")

    @property
    def files_dir(self) -> Path:
        """Where files that belong to the catalog but not in Milvus go (server uploads,
        caches): next to a Lite database, else under ``~/.cache/vestis/milvus``."""
        if self.file is not None:
            return self.file.parent / f"{self.file.name}.files"
        host = self.uri.removeprefix("http://").replace(":", "_")
        return Path.home() / ".cache" / "vestis" / "milvus" / host / self.name

    def with_name(self, name: str) -> str:
        """This location's URI for another collection name (a generation of it)."""
        if self.file is not None:
            return f"{LITE_PREFIX}{self.file}#{name}"
        return f"{SERVER_PREFIX}//{self.uri.removeprefix('http://')}/{name}"

    def __str__(self) -> str:
        return self.text


def milvus_index(choice: str, n: int, dim: int, *, lite: bool = False) -> dict[str, Any]:
    """The Milvus index for a vestis index choice with ``n`` vectors of ``dim``:
    ``{"index_type", "params", "search"}``. ``auto`` goes by size as the embedded store's
    does (FLAT, then HNSW, then IVF_PQ); presets and FAISS strings map to their Milvus kin
    (fp16 variants to their float32 kin: Milvus keeps FLOAT_VECTOR); a Milvus index type
    (``IVF_SQ8``, ``DISKANN``) is taken as named. ValueError for anything else.

    ``lite``: for Milvus Lite, which builds FLAT, HNSW, IVF_FLAT and IVF_SQ8 only: ``auto``
    takes IVF_SQ8 where a server takes IVF_PQ, and an explicit IVF_PQ or DISKANN is refused.
    """
    spec = _milvus_index(choice, n, dim)
    if lite and spec["index_type"] in LITE_UNSUPPORTED:
        if choice.strip().lower() != AUTO:
            raise ValueError(f"Milvus Lite cannot build index {choice!r} "
                             f"({spec['index_type']}; a Milvus server can): use auto, flat, "
                             "hnsw, IVF_FLAT or IVF_SQ8")
        spec = _milvus_index("IVF_SQ8", n, dim)
    return spec


def _milvus_index(choice: str, n: int, dim: int) -> dict[str, Any]:
    key = choice.strip()
    upper = key.upper().replace("-", "_")
    if upper in MILVUS_INDEX_TYPES:
        kind = upper
        factory = {"FLAT": "Flat", "HNSW": f"HNSW{HNSW_M}"}.get(kind, "")
    else:
        factory = resolve_factory(key, n, dim)
        kind = _kind_of_factory(factory, choice)
    lists = ivf_lists(n)
    if factory.startswith("IVF"):
        lists = int(factory[3:].split(",")[0].split("_")[0] or lists)
    if kind == "FLAT":
        return {"index_type": "FLAT", "params": {}, "search": {}}
    if kind == "HNSW":
        m = int(re.match(r"HNSW(\d*)", factory or "HNSW").group(1) or HNSW_M)
        return {"index_type": "HNSW", "params": {"M": m, "efConstruction": HNSW_EF_CONSTRUCTION},
                "search": {"ef": HNSW_EF_SEARCH}}
    nprobe = min(lists, max(8, min(64, lists // 16)))
    if kind == "IVF_PQ":
        m = pq_bytes(dim)
        if m < 8:  # awkward (near-prime) dims: 8-bit scalar codes, as the embedded store does
            kind = "IVF_SQ8"
        else:
            return {"index_type": "IVF_PQ", "params": {"nlist": lists, "m": m, "nbits": 8},
                    "search": {"nprobe": nprobe}}
    if kind in ("IVF_SQ8", "IVF_FLAT"):
        return {"index_type": kind, "params": {"nlist": lists}, "search": {"nprobe": nprobe}}
    return {"index_type": "DISKANN", "params": {}, "search": {"search_list": 100}}


def _kind_of_factory(factory: str, choice: str) -> str:
    if factory in ("Flat", "SQfp16"):
        return "FLAT"
    if factory.startswith("HNSW"):
        return "HNSW"
    match = re.fullmatch(r"IVF\d+(?:_HNSW\d+)?,(PQ\d+(?:x8)?|SQ8|Flat)", factory)
    if match:
        code = match.group(1)
        return "IVF_PQ" if code.startswith("PQ") else "IVF_SQ8" if code == "SQ8" else "IVF_FLAT"
    raise ValueError(f"index {choice!r} has no Milvus equivalent; use auto, flat, hnsw, ivfpq "
                     f"or a Milvus index type ({', '.join(MILVUS_INDEX_TYPES)})")


def describe_index(spec: dict[str, Any]) -> str:
    """``HNSW(M=32,efConstruction=200)``: a Milvus index as ``info`` shows it."""
    params = ",".join(f"{k}={v}" for k, v in spec["params"].items())
    return f"{spec['index_type']}({params})" if params else spec["index_type"]


def _bytes_per_vector(spec: dict[str, Any], dim: int) -> float:
    """An estimate (Milvus does not report index sizes): raw float32 vectors for FLAT, HNSW
    (plus its graph links) and DiskANN's memory part; codes plus the id for IVF."""
    kind, params = spec["index_type"], spec["params"]
    if kind == "HNSW":
        return 4.0 * dim + 2 * params.get("M", HNSW_M) * 4 + 8
    if kind == "IVF_PQ":
        return params.get("m", dim) * params.get("nbits", 8) / 8 + 8
    if kind == "IVF_SQ8":
        return dim + 8.0
    return 4.0 * dim + 8


def _hash(text: str, size: int = 32) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size // 2).hexdigest()


def item_key(item_id: str) -> str:
    """The item's primary key in Milvus: a hash of its id (hex, safe in any expression)."""
    return _hash(item_id)


def _stored_text(value: Any) -> str | None:
    """A stored metadata value as the embedded store's filter reads it (SQLite's CAST of the
    JSON value to TEXT): text as is, booleans ``1``/``0``, numbers as SQLite prints them,
    lists and objects as compact JSON; ``None`` (JSON null) is no value."""
    if value is None:
        return None
    if isinstance(value, (bool, str, int)):
        return filter_text(value)
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e15 else f"{value:.1f}"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def filter_keys(item_metadata: dict[str, Any], image_metadata: dict[str, Any]) -> dict[str, str]:
    """The ``filt`` field of an image: hashed key → hashed text of its effective value (the
    image's own, else its item's)."""
    merged: dict[str, str] = {}
    for metadata in (item_metadata, image_metadata):
        for key, value in metadata.items():
            text = _stored_text(value)
            if text is not None:
                merged[_hash(key, 16)] = _hash(text)
    return merged


def filter_expression(where: dict[str, Any]) -> str | None:
    """The Milvus expression for a ``where`` filter (see
    :meth:`vestis.catalog.backend.CatalogStore.filtered_image_ids`); ``None`` when it can
    keep nothing (an empty list of values). Only hex digests appear in it."""
    clauses = []
    for key, value in where.items():
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if not values:
            return None
        if str(key) == "item_id":
            keys = sorted({item_key(str(v)) for v in values})
            clauses.append("item_key in [" + ", ".join(f'"{k}"' for k in keys) + "]")
            continue
        field = f'filt["{_hash(str(key), 16)}"]'
        tests = sorted({f'{field} == "{_hash(filter_text(v))}"' for v in values})
        clauses.append(tests[0] if len(tests) == 1 else "(" + " or ".join(tests) + ")")
    return " and ".join(clauses)


class MilvusStore:
    """:class:`vestis.catalog.backend.CatalogStore` on Milvus (server or Lite).

    Thread-safe within one process: ``lock`` serialises this object's client calls.
    ``aliased=False``: plain collections named after the location (a generation being
    built, :class:`vestis.catalog.milvus_switch.MilvusBeside`).
    """

    read_only = False

    def __init__(self, location: str | MilvusLocation, *, client=None, aliased: bool = True):
        self.location = location if isinstance(location, MilvusLocation) \
            else MilvusLocation(location)
        self.lock = threading.RLock()
        if client is None:
            if self.location.file is not None:
                self.location.file.parent.mkdir(parents=True, exist_ok=True)
            client = _connect(self.location)
        #: The pymilvus client itself (this store's calls go through :class:`_Guarded`).
        self.raw_client = client
        self._client = _Guarded(client, self)
        name = self.location.name
        self._aliased = aliased
        if aliased:
            milvus_switch.recover(client, name)
        #: The generation this store reads (``NAME_gK``; ``NAME`` for a legacy catalog).
        self.prefix = (milvus_switch.current_prefix(client, name) or f"{name}_g0") \
            if aliased else name
        self._images_name, self._items_name, self._meta_name = (
            f"{self.prefix}_images", f"{self.prefix}_items", f"{self.prefix}_meta")
        self._fixed: dict[str, str] = {}  # meta that never changes once set (model, dim)
        self._added = False
        self._ensure_collections()

    @staticmethod
    def exists(location: str | MilvusLocation) -> bool:
        """Whether the catalog exists (a Lite database is not created to find out)."""
        location = location if isinstance(location, MilvusLocation) \
            else MilvusLocation(location)
        if location.file is not None and not location.file.exists():
            return False
        client = _connect(location)
        try:
            milvus_switch.recover(client, location.name)  # a switch cut short
            return client.has_collection(f"{location.name}_meta")
        finally:
            client.close()

    @property
    def replaced(self) -> bool:
        """Whether the catalog's meta name reads another generation than this store's (a
        re-embedding switched it since this store was opened); for a legacy catalog, read
        through names that a switch turns into aliases, also whether its images name
        already reads another collection (the switch moves it first)."""
        if self.current_prefix() != self.prefix:
            return True
        if self._legacy:
            images = f"{self.prefix}_images"
            return milvus_switch.target(self.raw_client, images) not in (images, None)
        return False

    @property
    def _legacy(self) -> bool:
        return self._aliased and self.prefix == self.location.name

    def current_prefix(self) -> str | None:
        """The generation the catalog's names read now (:attr:`prefix` until a switch)."""
        return milvus_switch.current_prefix(self.raw_client, self.location.name) \
            if self._aliased else self.prefix

    def _check_replaced(self) -> None:
        if self.replaced:
            raise CatalogReplacedError(
                f"catalog {self.location} was re-embedded by another process or object "
                "(vestis adapt --catalog) since it was opened here; open it again")

    # -- collections ---------------------------------------------------------------------
    def _ensure_collections(self) -> None:
        from pymilvus import DataType, MilvusClient

        client = self._client
        if not (client.has_collection(self._meta_name) and
                client.has_collection(self._items_name)):
            self._check_not_dropped()
        if not client.has_collection(self._meta_name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("value", DataType.VARCHAR, max_length=65535)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
            self._create(self._meta_name, schema, "v", {"index_type": "FLAT", "params": {}})
        if not client.has_collection(self._items_name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("item_key", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("item_id", DataType.VARCHAR, max_length=_MAX_ID)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
            self._create(self._items_name, schema, "v", {"index_type": "FLAT", "params": {}})
        for kind in ("meta", "items", "images"):
            if client.has_collection(f"{self.prefix}_{kind}"):
                self._alias(kind)
        for name in (self._meta_name, self._items_name, self._images_name):
            self._load(name)

    def _alias(self, kind: str) -> None:
        """The catalog's name for one of its collections (a new catalog's, once made)."""
        if self._aliased and self.prefix != self.location.name:
            milvus_switch.name_if_missing(self.raw_client, self.location.name, kind,
                                          self.prefix)

    def _check_not_dropped(self) -> None:
        """Before a missing collection is created: the catalog is new (no meta name yet),
        not one switched to another generation since this store resolved its own."""
        current = self.current_prefix()
        if current is not None and current != self.prefix:
            self._check_replaced()

    def _load(self, name: str) -> None:
        """Collections of an existing catalog are loaded (a new process finds them released)."""
        client = self._client
        if client.has_collection(name) and "Loaded" not in str(
                client.get_load_state(name).get("state", "")):
            client.load_collection(name)

    def _create(self, name: str, schema, field: str, spec: dict[str, Any]) -> None:
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name=field, index_type=spec["index_type"],
                               metric_type="IP", params=spec["params"])
        self._client.create_collection(name, schema=schema, index_params=index_params,
                                       consistency_level="Strong")

    def _images(self) -> str:
        """The images collection, created with the catalog's dimension on first use."""
        if not self._client.has_collection(self._images_name):
            from pymilvus import DataType, MilvusClient

            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("item_id", DataType.VARCHAR, max_length=_MAX_ID)
            schema.add_field("item_key", DataType.VARCHAR, max_length=64)
            schema.add_field("path", DataType.VARCHAR, max_length=_MAX_PATH)
            schema.add_field("sha256", DataType.VARCHAR, max_length=128)
            schema.add_field("box", DataType.VARCHAR, max_length=128)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("filt", DataType.JSON)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
            self._create(self._images_name, schema, "vec", self._index_spec())
            self._alias("images")
        return self._images_name

    def _has_images(self) -> bool:
        """Whether the images collection exists (CatalogReplacedError when it was dropped
        by a switch to another generation)."""
        found = self._client.has_collection(self._images_name)
        if not found and self._aliased:
            self._check_replaced()
        return found

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        if key in self._fixed:
            return self._fixed[key]
        with self.lock:
            rows = self._client.get(self._meta_name, ids=[key], output_fields=["value"])
        value = rows[0]["value"] if rows else default
        if rows and key in ("model_name", "model_id", "dim"):
            self._fixed[key] = value
        return value

    def _all_meta(self) -> dict[str, str]:
        with self.lock:
            rows = self._client.query(self._meta_name, filter='key != ""',
                                      output_fields=["key", "value"], limit=16384)
        return {row["key"]: row["value"] for row in rows}

    def _put_meta(self, values: dict[str, str]) -> None:
        if values:
            self._client.upsert(self._meta_name, [{"key": k, "value": str(v), "v": _ZERO}
                                                  for k, v in values.items()])

    def set_meta(self, values: dict[str, str]) -> None:
        with self.writing():
            self._put_meta(values)
            self._bump()

    def create_meta(self, values: dict[str, str], key: str) -> dict[str, str]:
        with self.writing():
            if self.get_meta(key) is None:
                extra = {}
                if "index_choice" in values and "dim" in values:  # a new catalog's index
                    spec = self._spec(values["index_choice"], 0, int(values["dim"]))
                    extra = {"milvus_index": json.dumps(spec),
                             "milvus_search": _params_text(spec["search"])}
                self._put_meta({**values, **extra})
                self._bump()
            stored = self._all_meta()
        return {k: stored[k] for k in values if k in stored}

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def _bump(self) -> None:
        """One more write (read-modify-write: exact for one writer, see the module doc)."""
        self._put_meta({"generation": str(self.generation + 1)})

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """This object's lock: writers of this process take turns; Milvus has no lock
        across processes (see the module docstring). CatalogReplacedError once the catalog
        was switched to another generation."""
        with self.lock:
            self._check_replaced()
            yield

    @property
    def dim(self) -> int:
        return int(self.get_meta("dim"))

    @property
    def index_choice(self) -> str:
        return self.get_meta("index_choice") or AUTO

    def _index_spec(self) -> dict[str, Any]:
        stored = self.get_meta("milvus_index")
        if stored:
            return json.loads(stored)
        return self._spec(self.index_choice, 0)

    @property
    def factory(self) -> str:
        return describe_index(self._index_spec())

    @property
    def search_params(self) -> str:
        stored = self.get_meta("milvus_search")
        return stored if stored is not None else _params_text(self._index_spec()["search"])

    def init_index(self, choice: str | None) -> None:
        """Store the Milvus index of the catalog's choice, once (the catalog's own
        ``factory`` meta is the embedded store's and unused here)."""
        if self.get_meta("milvus_index") is None:
            with self.writing():
                spec = self._spec(self.get_meta("index_choice") or choice or AUTO,
                                  self._count_images())
                self._put_meta({"milvus_index": json.dumps(spec),
                                "milvus_search": _params_text(spec["search"])})

    # -- reads -------------------------------------------------------------------------
    def _count(self, collection: str) -> int:
        with self.lock:
            rows = self._client.query(collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def count_items(self) -> int:
        return self._count(self._items_name)

    def count_images(self) -> int:
        return self._count_images()

    def _count_images(self) -> int:
        return self._count(self._images_name) if self._has_images() else 0

    def _query_all(self, collection: str, expression: str, fields: list[str]) -> list[dict]:
        """Every row an expression keeps, in windows of the primary key small enough for one
        query each (Milvus caps a query's rows; Lite has no query iterator timestamps):
        image ids in windows of :data:`PAGE` up to the id counter, item keys (hex digests)
        by their first hex digits."""
        if collection == self._images_name:
            end = int(self.get_meta("next_id", "1"))
            windows = [f"id >= {lo} and id < {lo + PAGE}" for lo in range(0, end, PAGE)]
            limit = PAGE
        else:
            digits = 0
            while self._count(collection) / 16 ** digits > MAX_ROWS / 8 and digits < 4:
                digits += 1
            windows = _key_windows(digits)
            limit = MAX_ROWS
        rows: list[dict] = []
        for window in windows:
            where = f"({window}) and ({expression})" if expression else window
            with self.lock:
                found = self._client.query(collection, filter=where, output_fields=fields,
                                           limit=limit)
            if len(found) >= limit and limit == MAX_ROWS:
                raise RuntimeError(f"{self.location}: more than {MAX_ROWS} items share "
                                   "their first key digits; cannot list them")
            rows.extend(found)
        return rows

    def _image_rows(self, expression: str) -> list[dict]:
        if not self._has_images():
            return []
        return self._query_all(self._images_name, expression, _ROW_FIELDS)

    def _images_of_items(self, keys: Sequence[str], fields: list[str]) -> list[dict]:
        """The image rows of a few items, one query each 256 items (an item has a handful
        of images, far under a query's :data:`MAX_ROWS`)."""
        if not keys or not self._has_images():
            return []
        rows: list[dict] = []
        for start in range(0, len(keys), 256):
            with self.lock:
                found = self._client.query(self._images_name, filter=_key_in(
                    keys[start:start + 256]), output_fields=fields, limit=MAX_ROWS)
            if len(found) >= MAX_ROWS:
                raise RuntimeError(f"{self.location}: over {MAX_ROWS} images for 256 items")
            rows.extend(found)
        return rows

    def known_hashes(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        wanted = set(pairs)
        if not wanted or not self._has_images():
            return set()
        keys = sorted({item_key(item_id) for item_id, _ in wanted})
        rows = self._images_of_items(keys, ["item_id", "sha256"])
        return wanted & {(row["item_id"], row["sha256"]) for row in rows}

    def item_ids(self) -> list[str]:
        rows = self._query_all(self._items_name, "", ["item_id"])
        return sorted(row["item_id"] for row in rows)

    def _items_by_key(self, keys: Sequence[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        keys = list(keys)
        for start in range(0, len(keys), 1024):
            with self.lock:
                rows = self._client.get(self._items_name, ids=keys[start:start + 1024],
                                        output_fields=["item_id", "meta"])
            found.update((row["item_key"], row) for row in rows)
        return found

    def item_metadata(self, item_id: str) -> dict[str, Any] | None:
        row = self._items_by_key([item_key(item_id)]).get(item_key(item_id))
        if row is None or row["item_id"] != item_id:
            return None
        return dict(row["meta"] or {})

    def images_of(self, item_id: str) -> list[ImageRow]:
        rows = self._images_of_items([item_key(item_id)], _ROW_FIELDS)
        return sorted((_row(r) for r in rows if r["item_id"] == item_id),
                      key=lambda r: r.image_id)

    def images_by_id(self, image_ids: Sequence[int]) -> dict[int, ImageRow]:
        wanted = [int(i) for i in image_ids]
        if not wanted or not self._has_images():
            return {}
        found = {}
        for start in range(0, len(wanted), PAGE):
            with self.lock:
                rows = self._client.get(self._images_name, ids=wanted[start:start + PAGE],
                                        output_fields=_ROW_FIELDS)
            found.update((int(r["id"]), _row(r)) for r in rows)
        return found

    def image_ids(self) -> np.ndarray:
        if not self._has_images():
            return np.zeros(0, dtype=np.int64)
        rows = self._query_all(self._images_name, "", ["id"])
        return np.sort(np.array([int(r["id"]) for r in rows], dtype=np.int64))

    def iter_vectors(self, batch: int = PAGE) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = self.image_ids()
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            yield chunk, self.vectors_by_id(chunk, batch)

    def vectors_by_id(self, image_ids: Sequence[int], batch: int = PAGE) -> np.ndarray:
        wanted = [int(i) for i in image_ids]
        if not wanted:
            return np.zeros((0, 0), dtype=np.float32)
        found: dict[int, list[float]] = {}
        if self._has_images():
            for start in range(0, len(wanted), batch):
                with self.lock:
                    rows = self._client.get(self._images_name, ids=wanted[start:start + batch],
                                            output_fields=["vec"])
                found.update((int(r["id"]), r["vec"]) for r in rows)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"no stored vector for image ids {missing[:5]}")
        return np.array([found[i] for i in wanted], dtype=np.float32)

    def sample_image_ids(self, limit: int, seed: int = 0) -> np.ndarray:
        ids = self.image_ids()
        if len(ids) <= limit:
            return ids
        return np.sort(np.random.default_rng(seed).choice(ids, limit, replace=False))

    def filtered_image_ids(self, where: dict[str, Any]) -> np.ndarray:
        expression = filter_expression(where)
        if expression is None or not self._has_images():
            return np.zeros(0, dtype=np.int64)
        rows = self._query_all(self._images_name, expression, ["id"])
        return np.sort(np.array([int(r["id"]) for r in rows], dtype=np.int64))

    def metadata_keys(self) -> list[str]:
        keys = set()
        for row in self._query_all(self._items_name, "", ["meta"]):
            keys.update(row["meta"] or {})
        for row in self._image_rows(""):
            keys.update(row["meta"] or {})
        return sorted(keys)

    def search_items(self, vectors: np.ndarray, k: int,
                     where: dict[str, Any] | None = None) -> list[list[ItemHit]]:
        """The ``k`` best items per query: Milvus groups the hits by ``item_id`` (each item
        once, by its best image); where grouping is not available the image search widens
        until ``k`` items appear, as the embedded store's does."""
        if self._legacy:  # its names may read a new generation: never with this model
            self._check_replaced()
        expression = filter_expression(where) if where else ""
        if expression is None or not self._has_images():
            return [[] for _ in vectors]
        data = np.asarray(vectors, dtype=np.float32).tolist()
        params = {"metric_type": "IP", "params": _search_params(self.search_params)}
        with self.lock:
            try:
                results = self._client.search(
                    self._images_name, data=data, limit=k, filter=expression,
                    output_fields=_ROW_FIELDS, search_params=params, group_by_field="item_id")
            except Exception:  # noqa: BLE001 - a Milvus without grouping: widen instead
                results = [self._widened(row, k, expression, params) for row in data]
        found = [[(float(hit["distance"]), _row({**hit["entity"], "id": hit["id"]}))
                  for hit in hits] for hits in results]
        items = self._items_by_key(sorted({item_key(r.item_id) for hits in found
                                           for _, r in hits}))
        return [[ItemHit(score, row, dict(items.get(item_key(row.item_id), {}).get("meta") or {}))
                 for score, row in _best_per_item(hits, k)] for hits in found]

    def _widened(self, vector: list[float], k: int, expression: str,
                 params: dict) -> list[dict]:
        available = self._count_images()
        fetch = min(max(available, 1), k * 4)
        while True:
            hits = self._client.search(self._images_name, data=[vector], limit=fetch,
                                       filter=expression, output_fields=_ROW_FIELDS,
                                       search_params=params)[0]
            if len({h["entity"]["item_id"] for h in hits}) >= k or fetch >= available:
                return list(hits)
            fetch = min(available, fetch * 4)

    # -- the vector index --------------------------------------------------------------
    def index_info(self) -> dict[str, Any]:
        """Milvus indexes the collection's own rows, so the index holds exactly the stored
        ids once Milvus has indexed them all (``pending_index_rows``). Bytes per vector are
        an estimate from the index type (Milvus does not report index sizes)."""
        count = self._count_images()
        pending = 0
        if count:
            with self.lock:
                described = self._client.describe_index(self._images_name, "vec") or {}
            pending = int(described.get("pending_index_rows", 0) or 0)
        return {"indexed_vectors": count - pending, "index_in_sync": pending == 0,
                "index_bytes_per_vector": round(_bytes_per_vector(self._index_spec(),
                                                                  self.dim), 1) if count else 0}

    def measure_recall(self, k: int = 10, *, queries: int = 200, seed: int = 0) -> float:
        ids = self.sample_image_ids(queries, seed)
        if not len(ids):
            return 1.0
        vectors = self.vectors_by_id(ids)
        k = min(k, self._count_images())
        _, exact = exact_top_k(vectors, self.iter_vectors(), k)
        params = {"metric_type": "IP", "params": _search_params(self.search_params)}
        with self.lock:
            results = self._client.search(self._images_name, data=vectors.tolist(), limit=k,
                                          search_params=params)
        found = np.full((len(ids), k), -1, dtype=np.int64)
        for n, hits in enumerate(results):
            found[n, :len(hits)] = [int(h["id"]) for h in hits]
        return recall_at_k(found, exact)

    def rebuild_index(self, index: str | None = None, search_params: str | None = None) -> None:
        """Recreate the Milvus index for a (new) choice; ``search_params`` alone (``ef=256``,
        ``nprobe=32``; the FAISS names ``efSearch`` also work) only re-tunes searches."""
        with self.writing():
            if search_params is not None:
                _search_params(search_params)  # a bad string fails before anything changes
            if index is None and search_params is not None:
                self._put_meta({"milvus_search": search_params})
                self._bump()
                return
            choice = index or self.index_choice
            spec = self._spec(choice, self._count_images())
            self._recreate_index(spec)
            self._put_meta({"index_choice": choice, "milvus_index": json.dumps(spec),
                            "milvus_search": search_params if search_params is not None
                            else _params_text(spec["search"])})
            self._bump()

    def _spec(self, choice: str, n: int, dim: int | None = None) -> dict[str, Any]:
        return milvus_index(choice, n, dim or self.dim, lite=self.location.file is not None)

    def _recreate_index(self, spec: dict[str, Any]) -> None:
        """Replace the vector index (Milvus drops it, then builds the new one); if Milvus
        refuses the new one, the old one is built again and the error raised."""
        if not self._has_images():
            return
        old = self._index_spec()
        try:
            self._build_index(spec)
        except Exception as exc:
            self._build_index(old)
            raise ValueError(f"Milvus cannot build index {describe_index(spec)}: "
                             f"{getattr(exc, 'message', exc)}") from exc

    def _build_index(self, spec: dict[str, Any]) -> None:
        client = self._client
        client.release_collection(self._images_name)
        with contextlib.suppress(Exception):  # none left by a failed build
            client.drop_index(self._images_name, "vec")
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vec", index_type=spec["index_type"],
                               metric_type="IP", params=spec["params"])
        client.create_index(self._images_name, index_params)
        client.load_collection(self._images_name)

    def _follow_size(self) -> None:
        """``auto`` and ``ivfpq`` follow the catalog's size, as in the embedded store."""
        if not is_sized(self.index_choice):
            return
        spec = self._spec(self.index_choice, self._count_images())
        if spec != self._index_spec():
            self._recreate_index(spec)
            self._put_meta({"milvus_index": json.dumps(spec),
                            "milvus_search": _params_text(spec["search"])})

    def save(self) -> None:
        """Milvus persists its own rows and indexes: nothing to do."""

    # -- writes ------------------------------------------------------------------------
    def add_images(self, images: Sequence[NewImage], item_metadata: dict[str, dict], *,
                   model_id: str | None = None) -> list[int]:
        """Check, create or merge the items, reserve ids, insert the images (see the module
        docstring: several Milvus writes, not one transaction)."""
        with self.writing():
            if model_id is not None:
                self._check_vectors(model_id, images)
            known = self.known_hashes((i.item_id, i.sha256) for i in images)
            fresh, seen = [], set(known)
            for n, image in enumerate(images):
                pair = (image.item_id, image.sha256)
                if pair not in seen:
                    seen.add(pair)
                    fresh.append(n)
            if not fresh and not any(item_metadata.values()):
                return [-1] * len(images)
            items = self._merge_items({**{images[n].item_id: {} for n in fresh},
                                       **item_metadata})
            ids = [-1] * len(images)
            if fresh:
                first = int(self.get_meta("next_id", "1"))
                self._put_meta({"next_id": str(first + len(fresh))})  # reserved before use
                rows = []
                for offset, n in enumerate(fresh):
                    image = images[n]
                    ids[n] = first + offset
                    rows.append(_image_record(ids[n], image, items[image.item_id]))
                collection = self._images()
                for start in range(0, len(rows), 1024):
                    self._client.insert(collection, rows[start:start + 1024])
                self._added = True
            self._bump()
        return ids

    def _check_vectors(self, model_id: str, images: Sequence[NewImage]) -> None:
        stored = self.get_meta("model_id")
        if stored != model_id:
            raise ModelMismatchError(f"vectors from model {model_id!r} cannot go into catalog "
                                     f"{self.location}, built with {stored!r}")
        dim = self.dim
        for image in images:
            if np.asarray(image.vector).size != dim:
                raise ModelMismatchError(
                    f"a {np.asarray(image.vector).size}-d vector cannot go into catalog "
                    f"{self.location}, whose vectors are {dim}-d")

    def _merge_items(self, item_metadata: dict[str, dict]) -> dict[str, dict]:
        """Create missing items and merge new metadata into existing ones; returns every
        named item's metadata now. Images of a changed item get their filter keys again."""
        keys = {item_id: item_key(item_id) for item_id in item_metadata}
        existing = self._items_by_key(sorted(set(keys.values())))
        now, upserts, changed = {}, [], []
        for item_id, metadata in item_metadata.items():
            row = existing.get(keys[item_id])
            if row is None:
                now[item_id] = dict(metadata)
            elif metadata:
                now[item_id] = {**(row["meta"] or {}), **metadata}
                changed.append(item_id)
            else:
                now[item_id] = dict(row["meta"] or {})
                continue
            upserts.append({"item_key": keys[item_id], "item_id": item_id,
                            "meta": now[item_id], "v": _ZERO})
        for start in range(0, len(upserts), 1024):
            self._client.upsert(self._items_name, upserts[start:start + 1024])
        for item_id in changed:
            self._refilter(item_id, now[item_id], drop=())
        return now

    def _refilter(self, item_id: str, metadata: dict[str, Any], drop: Iterable[str]) -> None:
        """Rewrite an item's images with new filter keys (and without the image metadata
        keys in ``drop``): Milvus upserts whole rows, vectors included."""
        if not self._has_images():
            return
        rows = self._images_of_items([item_key(item_id)], [*_ROW_FIELDS, "vec"])
        drop = set(drop)
        updated = []
        for row in rows:
            own = {k: v for k, v in (row["meta"] or {}).items() if k not in drop}
            updated.append({"id": int(row["id"]), "item_id": row["item_id"],
                            "item_key": row["item_key"], "path": row["path"],
                            "sha256": row["sha256"], "box": row["box"], "meta": own,
                            "filt": filter_keys(metadata, own),
                            "vec": [float(x) for x in row["vec"]]})
        for start in range(0, len(updated), 1024):
            self._client.upsert(self._images_name, updated[start:start + 1024])

    def commit(self) -> None:
        """After a batch of adds: Milvus Lite seals the new rows into its segments
        (until then it scans them row by row: 200 ms a search at 5,000 vectors, 14 ms
        after); a size-dependent index choice follows the catalog's size. A server seals
        on its own schedule (a flush per write would hit its rate limit)."""
        with self.writing():
            if self._added:
                self._added = False
                if self.location.file is not None:
                    for name in (self._images_name, self._items_name, self._meta_name):
                        self._client.flush(name)
                self._follow_size()

    def remove_item(self, item_id: str) -> list[int]:
        with self.writing():
            if self.item_metadata(item_id) is None:
                raise KeyError(item_id)
            ids = [row.image_id for row in self.images_of(item_id)]
            if ids:
                self._client.delete(self._images_name, ids=ids)
            self._client.delete(self._items_name, ids=[item_key(item_id)])
            self._bump()
        return ids

    def update_item(self, item_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        with self.writing():
            merged = self.item_metadata(item_id)
            if merged is None:
                raise KeyError(item_id)
            for key, value in metadata.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            self._client.upsert(self._items_name, [{"item_key": item_key(item_id),
                                                    "item_id": item_id, "meta": merged,
                                                    "v": _ZERO}])
            self._refilter(item_id, merged, drop=metadata)
            self._bump()
        return merged

    def close(self) -> None:
        with self.lock:
            self._client.close()


_ROW_FIELDS = ["id", "item_id", "item_key", "path", "sha256", "box", "meta"]


def _key_windows(digits: int) -> list[str]:
    """Expressions splitting hex item keys by their first ``digits`` hex digits."""
    if digits == 0:
        return ['item_key >= ""']
    width = 16 ** digits
    windows = []
    for n in range(width):
        low = f"{n:0{digits}x}"
        windows.append(f'item_key >= "{low}"' if n == width - 1
                       else f'item_key >= "{low}" and item_key < "{n + 1:0{digits}x}"')
    return windows


def _key_in(keys: Sequence[str]) -> str:
    return "item_key in [" + ", ".join(f'"{k}"' for k in keys) + "]"


def _image_record(image_id: int, image: NewImage, item_metadata: dict[str, Any]) -> dict:
    own = dict(image.metadata)
    if len(image.path) > _MAX_PATH or len(image.item_id) > _MAX_ID:
        raise ValueError(f"{image.path}: paths over {_MAX_PATH} and item ids over {_MAX_ID} "
                         "characters do not fit a Milvus catalog")
    return {"id": image_id, "item_id": image.item_id, "item_key": item_key(image.item_id),
            "path": image.path, "sha256": image.sha256,
            "box": json.dumps([int(v) for v in image.box]) if image.box else "",
            "meta": own, "filt": filter_keys(item_metadata, own),
            "vec": np.asarray(image.vector, dtype=np.float32).ravel().tolist()}


def _row(record: dict) -> ImageRow:
    box = record.get("box")
    return ImageRow(int(record["id"]), record["item_id"], record["path"], record["sha256"],
                    tuple(json.loads(box)) if box else None, dict(record.get("meta") or {}))


def _best_per_item(hits: list[tuple[float, ImageRow]], k: int) -> list[tuple[float, ImageRow]]:
    best: dict[str, tuple[float, ImageRow]] = {}
    for score, row in sorted(hits, key=lambda h: (-h[0], h[1].image_id)):
        best.setdefault(row.item_id, (score, row))
    return list(best.values())[:k]


def _params_text(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


_PARAM_NAMES = {"efsearch": "ef", "ef": "ef", "nprobe": "nprobe", "search_list": "search_list"}


def _search_params(text: str) -> dict[str, int]:
    """``ef=128,nprobe=16`` (FAISS's ``efSearch`` read as ``ef``) as Milvus search params."""
    params = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.partition("=")
        key = _PARAM_NAMES.get(name.strip().lower())
        if not sep or key is None or not value.strip().isdigit():
            raise ValueError(f"search parameter {part!r}: expected ef=N, efSearch=N, nprobe=N "
                             "or search_list=N")
        params[key] = int(value)
    return params


class _Guarded:
    """The store's pymilvus client: a call that fails once the catalog was switched to
    another generation (its collections dropped) raises CatalogReplacedError instead."""

    def __init__(self, client, store: MilvusStore):
        self._raw, self._store = client, store

    def __getattr__(self, name: str):
        attribute = getattr(self._raw, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except Exception:
                if name != "close" and _replaced_quietly(self._store):
                    self._store._check_replaced()
                raise
        return call


def _replaced_quietly(store: MilvusStore) -> bool:
    try:
        return store.replaced
    except Exception:  # noqa: BLE001 - the call's own error is the one to report
        return False


def _connect(location: MilvusLocation):
    """A client for the location; a Lite database another process holds is a one-line error."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import ConnectionConfigException

    # The Lite server runs in this process's machine and allows a keep-alive ping each
    # 5 minutes; the client's default (10 s) made it answer "too_many_pings" on stderr
    # during long adds. A server keeps the client's defaults.
    options = {} if location.file is None else {"grpc_options": {
        "grpc.keepalive_time_ms": 600_000, "grpc.keepalive_permit_without_calls": 0}}
    try:
        return MilvusClient(location.uri, **_server_auth(location), **options)
    except ConnectionConfigException as exc:
        if location.file is None:
            raise
        raise PermissionError(f"{location}: cannot open the Milvus Lite database ({exc.message}); "
                              "it is used by one process at a time: is another "
                              "vestis (a server?) holding it?") from exc


def _server_auth(location: MilvusLocation) -> dict[str, str]:
    """A server's token from ``MILVUS_TOKEN`` (``user:password`` or an API key)."""
    import os

    token = os.environ.get("MILVUS_TOKEN")
    return {"token": token} if token and location.file is None else {}

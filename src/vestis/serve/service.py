"""What the server does, without HTTP: load the catalog once, search it, change it safely.

Concurrency: the catalog serialises its own index and store access. Embedding (the slow
part) runs outside any lock, so searches proceed while another request adds an item; one
service-level lock makes each write's check-then-change atomic.

Memory: uploaded photos are decoded straight to at most ``work_side`` pixels on their long
side (:func:`vestis.images.load_reduced`) and refused over ``max_pixels`` (a quarter of the
command line's cap); boxes are given back in the full photo's pixels. Requests that decode
or run the model hold a slot of :attr:`CatalogService.pool` (:meth:`CatalogService.slot`),
so at most ``workers`` photos are in memory at once; ``POST /items`` decodes and embeds its
photos one at a time.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from vestis.atomic import write_atomic
from vestis.catalog import Catalog, GarmentHits, Item, ReadOnlyCatalogError
from vestis.catalog.backend import filter_text, store_kind
from vestis.catalog.catalog import DB_NAME, RESERVED_KEYS, content_hash
from vestis.catalog.garments import WHOLE_IMAGE
from vestis.catalog.ingest import photo_view
from vestis.catalog.store import ImageRow
from vestis.catalog.stores import files_dir, store_exists
from vestis.images import (
    SERVER_MAX_PIXELS,
    WORK_SIDE,
    Box,
    ImageError,
    Reduced,
    load_reduced,
)
from vestis.serve.pool import InferencePool

if TYPE_CHECKING:
    from vestis.catalog.outfits import OutfitResult

T = TypeVar("T")
UPLOADS_DIR = "uploads"
ITEM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_METADATA_KEYS = 100
MAX_KEY_LENGTH = 100
MAX_VALUE_LENGTH = 2000
MAX_FACET_VALUES = 200

_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
_SUFFIXES.update({"TIFF": ".tif", "MPO": ".jpg"})
_IMAGE_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png",
                "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}


class ItemExistsError(ValueError):
    """``POST /items`` named an item that is already in the catalog."""


class ServerFileError(RuntimeError):
    """A file on the server side (never the client's upload) could not be used."""


class NotReadyError(RuntimeError):
    """The model is still loading, or failed to load."""


@dataclass(frozen=True)
class SearchResult:
    width: int
    height: int
    garments: list[GarmentHits]


@dataclass(frozen=True)
class ImageFile:
    """A catalog image as served: its bytes and its decoded format's media type."""

    data: bytes
    media_type: str


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the client's name for it (for messages only) and its bytes."""

    filename: str
    data: bytes


class CatalogService:
    """One catalog, its model loaded once, shared by every request thread."""

    def __init__(self, catalog_dir: str | Path, *, pool: InferencePool | None = None,
                 max_pixels: int = SERVER_MAX_PIXELS, work_side: int = WORK_SIDE):
        self.pool = pool or InferencePool()
        self.max_pixels = max_pixels
        self.work_side = work_side
        milvus = store_kind(str(catalog_dir)) == "milvus"
        self._milvus = milvus
        #: The catalog as opened: a directory or a Milvus URI.
        self.location = str(catalog_dir) if milvus \
            else str(Path(catalog_dir).expanduser().absolute())
        #: The catalog's files outside its store (uploads): its directory, or the one a
        #: Milvus catalog keeps them in (:func:`vestis.catalog.stores.files_dir`).
        self.path = files_dir(self.location).absolute()
        if not store_exists(self.location):
            what = "no such Milvus catalog" if milvus else f"no {DB_NAME}"
            raise FileNotFoundError(
                f"{self.location}: not a vestis catalog ({what}); create it with vestis index"
            )
        self.uploads = self.path / UPLOADS_DIR
        self.state = "loading"
        self.error: str | None = None
        self._catalog: Catalog | None = None
        #: catalog.db of self._catalog; for Milvus, the generation its store reads
        self._opened_db: tuple[int, int] | str | None = None
        self._reopen_lock = threading.Lock()
        self._loaded = threading.Event()
        self._write_lock = threading.Lock()
        self._facets: tuple[int, dict[str, dict[str, Any]]] | None = None  # by generation
        self._heads: dict[str, Any] = {}  # attribute and outfit heads, loaded on first use

    # -- life cycle --------------------------------------------------------------------
    def load(self) -> None:
        """Open the catalog, load the model and its index, and run one warm-up embedding."""
        try:
            self._opened_db = self._db_identity()
            catalog = Catalog(self.location)
            if self._milvus:
                self._opened_db = catalog._store.prefix
            catalog.encoder.embed_one(Image.new("RGB", (64, 64), (127, 127, 127)))
            catalog.parser.parse(Image.new("RGB", (64, 96), (127, 127, 127)))
            catalog.info()  # loads (or rebuilds) the vector index
            self._catalog = catalog
            self.state = "ready"
        except Exception as exc:  # reported by /health; the process stays up to say so
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._loaded.set()

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def close(self) -> None:
        self.pool.close()
        if self._catalog is not None:
            self._catalog.close()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise NotReadyError(
                f"model failed to load: {self.error}"
                if self.state == "failed"
                else "the model is still loading; retry when /health says ready"
            )
        if self._db_identity() not in (None, self._opened_db):
            self._reopen()
        return self._catalog

    def _db_identity(self) -> tuple[int, int] | str | None:
        """What tells that the catalog was replaced: ``catalog.db``'s inode; for Milvus,
        the generation the open catalog reads, ``""`` once it was switched to another one
        (a call or two to Milvus)."""
        if self._milvus:
            store = self._catalog._store if self._catalog is not None else None
            return None if store is None else "" if store.replaced else store.prefix
        try:
            found = os.stat(self.path / DB_NAME)
        except OSError:
            return None
        return (found.st_dev, found.st_ino)

    def _reopen(self) -> None:
        """The catalog directory was replaced since it was opened (``vestis adapt
        --catalog`` swaps a re-embedded copy in; a Milvus catalog was switched to a new
        generation): open the new one, with its model. The old one serves until then, and
        requests still holding it finish on it (it is not closed: its files are gone, and
        writes to it fail)."""
        with self._reopen_lock:
            identity = self._db_identity()
            if identity in (None, self._opened_db):
                return
            catalog = Catalog(self.location)
            catalog.encoder.embed_one(Image.new("RGB", (64, 64), (127, 127, 127)))
            if self._milvus:
                identity = catalog._store.prefix
            self._catalog, self._opened_db = catalog, identity
            self._facets = None

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` on one of the pool's workers (BusyError when all are taken and the
        queue is full): the HTTP routes that decode a photo or run the model do it so."""
        return self.pool.run(work)

    def decode(self, data: bytes, name: str = "upload") -> Reduced:
        """An uploaded photo at the server's working size; ImageError names ``name``."""
        try:
            return load_reduced(data, max_side=self.work_side, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise ImageError(name, exc.reason) from None

    # -- reads -------------------------------------------------------------------------
    def search_text(self, text: str, k: int, where: dict[str, str] | None = None, *,
                    mode: str = "hybrid") -> list:
        """Items for a text query (see :func:`vestis.text.search.search_text`)."""
        from vestis.text.search import search_text

        return search_text(self.catalog, text, k, where=where or None, mode=mode)

    def search_photo_text(self, data: bytes, text: str, k: int,
                          where: dict[str, str] | None = None, *,
                          text_weight: float = 0.5) -> SearchResult:
        """Items like an uploaded photo, as a text changes it ("but in red")."""
        from vestis.text.search import search_image_text

        photo = self.decode(data)
        matches = search_image_text(self.catalog, photo.image, text, k, text_weight,
                                    where=where or None)
        box = (0, 0, photo.width, photo.height)
        return SearchResult(photo.width, photo.height, [GarmentHits(WHOLE_IMAGE, box, 1.0,
                                                                    matches)])

    def search(self, data: bytes, k: int, where: dict[str, str] | None = None, *,
               whole: bool = False, garment: str | None = None,
               compatible: bool = True, rerank: bool = False) -> SearchResult:
        """Search every garment of an uploaded photo (or, with ``whole``, the photo as one
        query); raises ImageError for a bad photo. See :meth:`Catalog.search_garments`.
        ``rerank``: the learned matcher re-orders each top 50 (:meth:`Catalog.search`)."""
        catalog = self.catalog
        photo = self.decode(data)
        if whole:
            box = (0, 0, photo.width, photo.height)
            hits = [GarmentHits(WHOLE_IMAGE, box, 1.0,
                                catalog.search(photo.image, k, where=where or None,
                                               rerank=rerank or None))]
        else:
            found = catalog.search_garments(photo.image, k, garment=garment,
                                            compatible=compatible, where=where or None,
                                            rerank=rerank or None)
            hits = [replace(hit, box=photo.full_box(hit.box)) for hit in found]
        return SearchResult(photo.width, photo.height, hits)

    def search_video(self, data: bytes, suffix: str, k: int, *, fusion: str = "learned",
                     every: int = 25, where: dict[str, str] | None = None,
                     name: str = "upload") -> list:
        """Tracks of an uploaded video and their matches (see
        :func:`vestis.video.search.search_video`); raises ``VideoError`` for a bad file,
        naming it ``name`` (the server's temporary path never reaches the client). The
        upload goes to a temporary file (containers such as MP4 need seeking), removed after."""
        import tempfile

        from vestis.video.reader import VideoError
        from vestis.video.search import search_video

        catalog = self.catalog
        with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
            handle.write(data)
            handle.flush()
            try:
                return search_video(catalog, handle.name, k, fusion=fusion, every=every,
                                    where=where or None)
            except VideoError as exc:
                reason = exc.reason.replace(handle.name, name)
                raise VideoError(name, reason.replace(Path(handle.name).name, name)) from None

    def describe(self, data: bytes) -> dict[str, Any]:
        """The attribute heads' reading of an uploaded photo (category and attributes)."""
        return self._attributes().describe(self.decode(data).image).to_dict()

    def complete(self, data: bytes, k: int, *, exclude_category: bool = True,
                 where: dict[str, str] | None = None) -> OutfitResult:
        """Catalog items that go with the garment of an uploaded photo (Comp-Net)."""
        from vestis.catalog.outfits import complete_outfit

        catalog = self.catalog
        image = self.decode(data).image  # only the upload's ImageError is the client's
        try:
            return complete_outfit(catalog, image, k, model=self._outfits(),
                                   exclude_category=exclude_category, where=where or None)
        except ImageError as exc:
            raise ServerFileError(f"a catalog image could not be read: {exc.reason}") from None

    def _attributes(self):
        from vestis.models.attributes import load_attribute_model

        if "attributes" not in self._heads:
            self._heads["attributes"] = load_attribute_model()
        return self._heads["attributes"]

    def _outfits(self):
        from vestis.models.compnet import load_outfit_model

        if "outfits" not in self._heads:
            self._heads["outfits"] = load_outfit_model()
        return self._heads["outfits"]

    def get(self, item_id: str) -> Item:
        return self.catalog.get(item_id)

    def image_file(self, image_id: int) -> ImageFile:
        """The bytes and ``image/*`` type of a catalog image, looked up by id.

        Served only when the file is still what was indexed: its content hash matches the
        stored one, or (rows that keep their vector's hash) it is a regular file, not a
        symlink. The type is the decoded format's, never the file name's. KeyError (a 404)
        when unknown, gone, changed or not an image."""
        catalog = self.catalog
        row = catalog.image(image_id)
        path = self._file_of(row)
        data = _read_file(path, image_id)
        # a box the garment parser found at ingest is not in the hash (the file as given is)
        if row.sha256 != content_hash(data, row.box) and not (
                row.box is not None and row.sha256 == content_hash(data)):
            if row.sha256 != catalog.stored_vector_hash(image_id) or path.is_symlink():
                raise KeyError(f"the file of image {image_id} changed since it was indexed")
        media_type = _IMAGE_TYPES.get(_format(data) or "")
        if media_type is None:
            raise KeyError(f"the file of image {image_id} is not an image")
        return ImageFile(data, media_type)

    def _file_of(self, row: ImageRow) -> Path:
        """An image's file; uploads stored relative to an old server's working directory
        (``some/dir/uploads/NAME``) are found in this catalog's uploads folder."""
        path = self.catalog.file_of(row)
        legacy = self.uploads / Path(row.path).name
        if not Path(row.path).is_absolute() and Path(row.path).parent.name == UPLOADS_DIR \
                and not path.exists() and legacy.exists():
            return legacy
        return path

    def stats(self) -> dict[str, Any]:
        info = self.catalog.info()
        info.pop("path", None)  # no server paths to clients
        return info

    def facets(self) -> dict[str, dict[str, Any]]:
        """Each metadata field with its distinct values (at most MAX_FACET_VALUES)."""
        generation = self.catalog.generation
        cached = self._facets
        if cached is not None and cached[0] == generation:
            return cached[1]
        values: dict[str, set[str]] = defaultdict(set)
        catalog = self.catalog
        for item_id in catalog.item_ids():
            try:
                item = catalog.get(item_id)
            except KeyError:  # removed meanwhile
                continue
            for metadata in (item.metadata, *(image.metadata for image in item.images)):
                for key, value in metadata.items():
                    values[key].add(filter_text(value))
        facets = {
            key: {
                "values": sorted(found)[:MAX_FACET_VALUES],
                "truncated": len(found) > MAX_FACET_VALUES,
            }
            for key, found in sorted(values.items())
        }
        self._facets = (generation, facets)
        return facets

    # -- writes ------------------------------------------------------------------------
    def add_item(
        self, uploads: Sequence[Upload], item_id: str | None, metadata: dict[str, Any]
    ) -> Item:
        """Add a new item with its photos; all or nothing.

        Raises ImageError (naming the bad file), ValueError (bad id or metadata) or
        ItemExistsError, each before anything is written.
        """
        catalog = self._writable()
        item_id = item_id or f"item-{uuid.uuid4().hex[:12]}"
        check_item_id(item_id)
        check_metadata(metadata, allow_none=False)
        if not uploads:
            raise ValueError("at least one image is needed")
        unique = list({hashlib.sha256(u.data).hexdigest(): u for u in uploads}.values())
        embedded = [self._embed_upload(upload, metadata) for upload in unique]
        vectors = np.stack([vector for vector, _, _ in embedded])
        boxes = [box for _, box, _ in embedded]
        image_metadata = [fields for _, _, fields in embedded]
        with self._write_lock:
            if item_id in catalog:
                raise ItemExistsError(f"item {item_id!r} already exists; PATCH it or DELETE it")
            paths = [self._save_upload(upload.data) for upload in unique]
            try:
                catalog.add_vectors(
                    [item_id] * len(paths),
                    vectors,
                    model_id=catalog.encoder.model_id,
                    paths=[_relative(p, self.path) for p in paths],
                    metadata=image_metadata,
                    boxes=boxes,
                    hashes=[content_hash(u.data, box) for u, box in zip(unique, boxes,
                                                                         strict=True)],
                )
            except BaseException:
                for path in paths:
                    path.unlink(missing_ok=True)
                raise
            item = catalog.get(item_id)
        # Two files with the same pixels give one image: drop the file that was not kept.
        kept = {image.path for image in item.images}
        for path in paths:
            if _relative(path, self.path) not in kept:
                path.unlink(missing_ok=True)
        return item

    def _embed_upload(self, upload: Upload, metadata: dict[str, Any]
                      ) -> tuple[np.ndarray, Box | None, dict[str, Any]]:
        """One photo's vector, box (its garment, in a catalog indexed with
        ``crop="garment"``, in the full photo's pixels) and metadata (with the ``garment``
        group, when known). Only this photo's pixels are in memory meanwhile."""
        catalog = self.catalog
        photo = self.decode(upload.data, upload.filename or "upload")
        vector, box, fields = photo_view(catalog.encoder, catalog.cropper, photo.image,
                                         metadata, catalog.crop_mode)
        return vector, photo.full_box(box) if box is not None else None, fields

    def update_item(self, item_id: str, metadata: dict[str, Any]) -> Item:
        check_metadata(metadata, allow_none=True)
        self._writable()
        with self._write_lock:
            self.catalog.update(item_id, metadata)
        return self.catalog.get(item_id)

    def remove_item(self, item_id: str) -> int:
        """Remove an item; its uploaded files go too. Returns the number of images removed."""
        self._writable()
        with self._write_lock:
            item = self.catalog.get(item_id)
            removed = self.catalog.remove(item_id)
        uploads = self.uploads.resolve()
        for image in item.images:
            path = self._file_of(image)
            if path.parent.resolve() == uploads:
                path.unlink(missing_ok=True)
        return removed

    def _writable(self) -> Catalog:
        """The catalog, for a write; ReadOnlyCatalogError when it is opened read-only."""
        catalog = self.catalog
        if catalog.read_only:
            raise ReadOnlyCatalogError("the catalog is read-only; writes are refused")
        return catalog

    def _save_upload(self, data: bytes) -> Path:
        """Keep an uploaded photo under the catalog, atomically, under a fresh name."""
        self.uploads.mkdir(parents=True, exist_ok=True)  # a Milvus catalog's files dir too
        path = self.uploads / f"{uuid.uuid4().hex}{_suffix(data)}"
        write_atomic(path, data)
        return path


def check_item_id(item_id: str) -> None:
    if not ITEM_ID_PATTERN.fullmatch(item_id):
        raise ValueError(
            f"invalid item_id {item_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def check_metadata(metadata: Any, *, allow_none: bool) -> None:
    """Metadata is a flat object of short scalar values (``None`` deletes, in updates)."""
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be a JSON object")
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(metadata)} keys; the limit is {MAX_METADATA_KEYS}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"metadata key {key!r} must be 1-{MAX_KEY_LENGTH} characters")
        if key in RESERVED_KEYS:
            raise ValueError(f"metadata key {key!r} is reserved")
        if value is None and allow_none:
            continue
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"metadata {key!r} must be a string, number or boolean")
        if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
            raise ValueError(f"metadata {key!r} is longer than {MAX_VALUE_LENGTH} characters")


def _format(data: bytes) -> str | None:
    """The image format Pillow reads in ``data`` (JPEG, PNG...), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:
        return None


def _suffix(data: bytes) -> str:
    return _SUFFIXES.get(_format(data) or "", ".img")


def _relative(path: Path, root: Path) -> str:
    """``path`` (under ``root``) as stored: relative to the catalog directory."""
    return path.relative_to(root).as_posix()


def _read_file(path: Path, image_id: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise KeyError(f"the file of image {image_id} is not a regular file")
            return handle.read()
    except OSError:
        raise KeyError(f"the file of image {image_id} is missing") from None


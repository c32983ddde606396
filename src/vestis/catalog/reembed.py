"""Re-embed a catalog with another model, crash-safe (``vestis reembed``, ``vestis adapt
--catalog``).

The new catalog is built complete beside the old one, from the old one's records, then
swapped in whole if no write reached the old one meanwhile: for a directory, as below
(:class:`LocalBeside`); for a Milvus catalog, as a new generation of collections switched in
by aliases (:class:`vestis.catalog.milvus_switch.MilvusBeside`, whose module says how a
crash is recovered).

The new catalog is built complete in a sibling directory (``DIR.adapting-<pid>``): the same
items (their metadata exactly as stored), the same images (path, box, content hash, image
metadata), the same index choice, crop mode and search parameters, and new vectors. Then,
under the old catalog's write lock and only if no write reached it meanwhile (its
``generation``), the two directories are exchanged in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``) and the old one is deleted. A crash at any moment leaves ``DIR`` either
the old catalog or the new one, complete; searches use the old vectors until the exchange.

Where the exchange is unavailable, two renames do it (``DIR`` -> ``DIR.old-<pid>``, the new
one -> ``DIR``): a crash between them leaves no ``DIR``, and
:func:`vestis.catalog.local.recover_swap` (run whenever a catalog is opened) puts the old
one back.

A process that had the old catalog open keeps reading the old (deleted) files; its next
write fails (:class:`vestis.catalog.local.CatalogReplacedError`) instead of reaching the new
catalog, and the server reopens the catalog when ``catalog.db`` is another file.

Images are re-embedded as they were embedded: a garment box the parser found (the content
hash is the one of the photo without it) in the context of its whole photo, a box the source
gave by itself, no box as the whole photo. Rows without a readable file (vectors added as
vectors) cannot be re-embedded: the catalog is then left unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vestis.catalog.backend import store_kind
from vestis.catalog.catalog import Catalog
from vestis.catalog.index import default_search_params
from vestis.catalog.ingest import IngestRunner
from vestis.catalog.local import DB_NAME, OLD_MARK
from vestis.catalog.store import ImageRow, NewImage
from vestis.images import file_digest, is_uri
from vestis.models import Encoder
from vestis.records import ImageRecord
from vestis.views import context_vectors

#: Images re-embedded and stored per transaction (whole items, so at least one item).
BATCH = 512
#: Given the new catalog, a context yielding where its embedding runs (e.g. a RayRunner).
RunnerFactory = Callable[[Catalog], AbstractContextManager[IngestRunner]]
#: renameat2(2) flag: exchange the two paths atomically.
RENAME_EXCHANGE = 2
AT_FDCWD = -100
TMP_MARK = ".adapting-"


class CatalogChangedError(ValueError):
    """The catalog was written to while it was being re-embedded; nothing was swapped."""


def catalog_records(catalog: Catalog) -> list[ImageRecord]:
    """One record per stored image: its file, item, box (``in_context`` where the garment
    parser found it, :func:`found_by_parser`) and metadata (item's, then image's)."""
    records = []
    for item_id in catalog.item_ids():
        item = catalog.get(item_id)
        for row in item.images:
            source = source_of(catalog, row)
            records.append(ImageRecord(source, item_id, box=row.box,
                                       in_context=found_by_parser(row, source),
                                       metadata={**item.metadata, **row.metadata}))
    return records


def found_by_parser(row: ImageRow, file: Path | str) -> bool:
    """Whether a stored image's box is a garment the parser found, which ingest embeds in
    its photo's context: ingest hashes the file as given, so then the stored hash is the
    file's own (a given box is part of its hash)."""
    return row.box is not None and file_digest(file)[0] == row.sha256


def source_of(catalog: Catalog, row: ImageRow) -> Path | str:
    """Where a stored image is read from: its URI, or its file (:meth:`Catalog.file_of`)."""
    return row.path if is_uri(row.path) else catalog.file_of(row)


def temporary_dir(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def remove_stale(path: Path) -> None:
    """Sibling directories left by a killed ``adapt --catalog`` (its process is gone)."""
    if not (path / DB_NAME).exists():
        return
    for mark in (TMP_MARK, OLD_MARK):
        for stale in path.parent.glob(f"{path.name}{mark}*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalBeside:
    """Where a catalog directory's copy is built (``DIR.adapting-<pid>``) and how it is
    swapped in (``swap``: exchanges two directories, default :func:`exchange`)."""

    def __init__(self, old: Catalog, swap: Callable[[Path, Path], None] | None = None):
        self.path = old.path.absolute()
        remove_stale(self.path)
        self.link_dir = temporary_dir(self.path)
        shutil.rmtree(self.link_dir, ignore_errors=True)
        self._swap = swap or exchange

    def new_catalog(self, model: str, index: str) -> Catalog:
        return Catalog(self.link_dir, model=model, index=index)

    def swap(self) -> None:
        self._swap(self.link_dir, self.path)

    def discard(self) -> None:
        shutil.rmtree(self.link_dir, ignore_errors=True)  # after the swap: the old catalog


def reembed(old: Catalog, model: str, *, progress: bool = False,
            swap: Callable | None = None, runner: RunnerFactory | None = None) -> int:
    """Replace catalog ``old`` (open) by the same catalog embedded with ``model``; returns
    the number of images re-embedded. ``swap``: replaces the final step, for tests (a
    directory's exchange of two paths, :func:`exchange`; a Milvus catalog's switch, given
    both locations). ``runner``: given the new catalog, a context that yields where the
    embedding runs (a :class:`vestis.catalog.ray_ingest.RayRunner`; default: here). On any
    error before the swap the catalog is left as it was and the new copy removed. ``old``
    is closed afterwards."""
    if old.read_only:
        raise ValueError(f"catalog {old.location} is read-only: it cannot be re-embedded")
    generation = old.generation
    beside = _beside(old, swap)
    try:
        count = _build(old, beside, model, progress, runner)
        with old._store.writing():
            if old.generation != generation:
                raise CatalogChangedError(
                    f"catalog {old.location} was changed while it was being re-embedded; it "
                    "is unchanged: run the command again")
            beside.swap()
        return count
    finally:
        with contextlib.suppress(Exception):
            beside.discard()
        with contextlib.suppress(Exception):
            old.close()


def _beside(old: Catalog, swap: Callable | None):
    if store_kind(old.location) == "milvus":
        from vestis.catalog.milvus_switch import MilvusBeside

        return MilvusBeside(old, swap)
    return LocalBeside(old, swap)


def _build(old: Catalog, beside, model: str, progress: bool,
           runner: RunnerFactory | None) -> int:
    """The new catalog (``beside.new_catalog``), complete and closed."""
    with beside.new_catalog(model, old.index_choice) as new, \
            (runner(new) if runner else contextlib.nullcontext(new.encoder)) as embedder:
        new._store.set_meta({"crop": old.crop_mode})
        if old.has_garment_groups:
            new._store.set_meta({"garment_groups": "1"})
        items: dict[str, dict] = {}
        rows: list[ImageRow] = []
        bar = tqdm(total=old.num_images, desc="re-embedding", unit="img", disable=not progress)
        for item_id in old.item_ids():
            item = old.get(item_id)
            items[item_id] = item.metadata
            rows += item.images
            if len(rows) >= BATCH:
                _store_batch(old, new, embedder, beside.link_dir, items, rows, bar)
                items, rows = {}, []
        if items:
            _store_batch(old, new, embedder, beside.link_dir, items, rows, bar)
        bar.close()
        new._store.commit()
        if old.search_params != default_search_params(new.factory) \
                and new.factory == old.factory:
            new.rebuild_index(search_params=old.search_params)
        return new.num_images


def embed_as_stored(embedder: IngestRunner | Encoder, encoder: Encoder, rows: list[ImageRow],
                    files: list) -> tuple[np.ndarray, list[str]]:
    """Stored images' files embedded as ingest embedded them (:func:`embed_views`), each
    box in context when the parser found it (:func:`found_by_parser`)."""
    return embed_views(embedder, encoder, files, [row.box for row in rows],
                       [found_by_parser(row, file) for row, file in zip(rows, files, strict=True)])


def embed_views(embedder: IngestRunner | Encoder, encoder: Encoder, files: list,
                boxes: list, in_context: list[bool], *, progress: bool = False
                ) -> tuple[np.ndarray, list[str]]:
    """Files embedded as ingest stores them by ``embedder`` (``encoder``, or a runner of
    it): a box the garment parser found (``in_context``) in its photo's context, a given
    box on its own, else the whole photo. Also the files that could not be embedded, with
    why (then no box is put in context)."""
    alone = [None if context else box for box, context in zip(boxes, in_context, strict=True)]
    vectors = np.zeros((len(files), encoder.dim), dtype=np.float32)
    errors = []
    for batch in embedder.iter_batches(files, alone, progress=progress):
        errors += [f"{files[position]}: {error.reason}" for position, error in batch.errors]
        vectors[batch.indices] = batch.vectors
    parsed = [n for n, context in enumerate(in_context) if context]
    if parsed and not errors:
        vectors[parsed] = context_vectors(encoder, [files[n] for n in parsed],
                                          [boxes[n] for n in parsed], whole=vectors[parsed],
                                          progress=progress)
    return vectors, errors


def _store_batch(old: Catalog, new: Catalog, embedder: IngestRunner | Encoder,
                 tmp: Path | None, items: dict[str, dict], rows: list[ImageRow], bar) -> None:
    """Embed and store one batch; files inside a catalog directory are linked into ``tmp``
    (None: the new catalog keeps the old one's files directory)."""
    files = [source_of(old, row) for row in rows]
    vectors, errors = embed_as_stored(embedder, new.encoder, rows, files)
    if errors:
        raise ValueError(f"{len(errors)} image(s) of the catalog cannot be re-embedded "
                         f"(first: {errors[0]}); the catalog is unchanged")
    for row in rows if tmp is not None else ():
        _link_inside(old.path, tmp, row.path)
    images = [NewImage(row.item_id, row.path, row.sha256, vector, row.metadata, row.box)
              for row, vector in zip(rows, vectors, strict=True)]
    new._store.add_images(images, items, model_id=new.model_id)
    bar.update(len(rows))


def _link_inside(old_dir: Path, new_dir: Path, stored: str) -> None:
    """A file stored relative to the catalog (an upload) and inside it: hard-linked (or
    copied) to the same place in the new directory. A relative path leading out of the
    catalog reaches the same file from the sibling directory. A URI is read where it is."""
    if not stored or is_uri(stored) or Path(stored).is_absolute():
        return
    source = old_dir / stored
    with contextlib.suppress(ValueError):
        relative = source.resolve().relative_to(old_dir.resolve())
        target = new_dir / relative
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def exchange(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path`` and the old ``path`` at ``new``: one atomic
    ``renameat2(RENAME_EXCHANGE)`` where available, else two renames that
    :func:`vestis.catalog.local.recover_swap` undoes after a crash between them."""
    if not _renameat2(new, path):
        old = path.with_name(f"{path.name}{OLD_MARK}{os.getpid()}")
        os.rename(path, old)
        os.rename(new, path)
        os.rename(old, new)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where directories can be opened)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _renameat2(a: Path, b: Path) -> bool:
    """Whether the kernel exchanged ``a`` and ``b`` (False where it cannot: not Linux, an
    old glibc, a file system without the flag)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")

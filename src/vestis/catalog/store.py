"""SQLite store of a catalog: items, their images, content hashes, metadata and vectors.

SQLite is the source of truth. Two counters in ``meta`` say how old a cache of it is:

* ``generation`` grows in every write transaction (vectors, metadata, meta), committed with
  it: a cache of anything stored (BM25 texts, facets, outfit features) is fresh while it
  was built at the store's generation;
* ``vector_epoch`` grows only when vectors are added or removed: the vector index is rebuilt
  or caught up from the stored vectors whenever it is older than that.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
#: Rows per SQLite read of vectors: bounds a chunk's memory (4096 x 1565 floats, 26 MB) and
#: an ``IN (?, ...)`` list's placeholders (SQLite allows 32,766).
VECTOR_BATCH = 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id  TEXT PRIMARY KEY,
    metadata TEXT NOT NULL DEFAULT '{}',
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id  TEXT NOT NULL REFERENCES items(item_id) ON DELETE CASCADE,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    box      TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    vector   BLOB NOT NULL,
    added    REAL NOT NULL,
    UNIQUE (item_id, sha256)
);
CREATE INDEX IF NOT EXISTS images_by_item ON images(item_id);
"""


class ModelMismatchError(ValueError):
    """Vectors from one model were offered to a catalog built with another."""


@dataclass(frozen=True)
class ImageRow:
    image_id: int
    item_id: str
    path: str
    sha256: str
    box: tuple[int, int, int, int] | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class NewImage:
    item_id: str
    path: str
    sha256: str
    vector: np.ndarray
    metadata: dict[str, Any]
    box: tuple[int, int, int, int] | None = None


def json_path(key: str) -> str:
    """A JSON path for a metadata key, quoted so any key name is safe."""
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Store:
    """All SQL lives here. Methods that change data run in one transaction each."""

    def __init__(self, path: Path):
        """Open (or create) the store; one that cannot be written (a read-only mount or
        files) opens read-only instead, with ``read_only`` set: reads work, writes fail."""
        self.path = Path(path)
        self._lock = threading.RLock()
        self.read_only = False
        try:
            self._db = self._open_for_writes()
        except sqlite3.OperationalError as exc:
            if not self.path.is_file() or not _cannot_write(exc):
                raise
            self._db = self._open_read_only(exc)
            self.read_only = True

    def _open_for_writes(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            db.execute("INSERT OR IGNORE INTO meta VALUES ('vector_epoch', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self, cause: Exception) -> sqlite3.Connection:
        """Read-only, sharing the WAL with writers where it can; on a read-only mount
        without the WAL's files, as an immutable file (nobody can change it there)."""
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?{flags}", uri=True,
                                 check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA busy_timeout=30000")
                db.execute("SELECT value FROM meta WHERE key = 'vector_epoch'").fetchall()
                return db
            except sqlite3.OperationalError:
                db.close()
        raise cause

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; it bumps ``generation`` as it commits (every write does)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._bump_generation(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one consistent state of the store (one read transaction), so a
        ``vector_epoch`` read there describes the vectors read there. Nests in a transaction."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- meta ------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, values: dict[str, str]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def create_meta(self, values: dict[str, str], key: str) -> dict[str, str]:
        """Store ``values`` unless ``key`` is already set, in one transaction; returns what
        is stored for those keys then (``values`` when this call created them)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone() is None:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))
            marks = ",".join("?" * len(values))
            rows = db.execute(f"SELECT key, value FROM meta WHERE key IN ({marks})",
                              list(values)).fetchall()
        return dict(rows)

    @property
    def vector_epoch(self) -> int:
        return int(self.get_meta("vector_epoch", "0"))

    @property
    def generation(self) -> int:
        """The number of committed write transactions (from any process)."""
        return int(self.get_meta("generation", "0"))

    @staticmethod
    def _bump_generation(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO meta VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE "
                   "SET value = CAST(value AS INTEGER) + 1")

    @staticmethod
    def _bump_epoch(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'vector_epoch'")

    # -- reads -----------------------------------------------------------------------
    def count_items(self) -> int:
        return self._query("SELECT COUNT(*) FROM items")[0][0]

    def count_images(self) -> int:
        return self._query("SELECT COUNT(*) FROM images")[0][0]

    def known_hashes(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (item_id, sha256) pairs are already stored."""
        wanted = set(pairs)
        if not wanted:
            return set()
        rows = self._query("SELECT item_id, sha256 FROM images")
        return wanted & {(item_id, sha) for item_id, sha in rows}

    def item_metadata(self, item_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT metadata FROM items WHERE item_id = ?", (item_id,))
        return json.loads(rows[0][0]) if rows else None

    def images_of(self, item_id: str) -> list[ImageRow]:
        return self._image_rows("WHERE item_id = ? ORDER BY image_id", (item_id,))

    def images_by_id(self, image_ids: Sequence[int]) -> dict[int, ImageRow]:
        if not len(image_ids):
            return {}
        marks = ",".join("?" * len(image_ids))
        rows = self._image_rows(f"WHERE image_id IN ({marks})", [int(i) for i in image_ids])
        return {row.image_id: row for row in rows}

    def _image_rows(self, where: str, params: Sequence) -> list[ImageRow]:
        rows = self._query(
            f"SELECT image_id, item_id, path, sha256, box, metadata FROM images {where}", params
        )
        return [
            ImageRow(
                r[0], r[1], r[2], r[3], tuple(json.loads(r[4])) if r[4] else None, json.loads(r[5])
            )
            for r in rows
        ]

    def image_ids(self) -> np.ndarray:
        """Every stored image id, ascending."""
        rows = self._query("SELECT image_id FROM images ORDER BY image_id")
        return np.array([row[0] for row in rows], dtype=np.int64)

    def item_ids(self) -> list[str]:
        return [row[0] for row in self._query("SELECT item_id FROM items ORDER BY item_id")]

    def iter_vectors(self, batch: int = VECTOR_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (image ids, vectors) in id order, in chunks."""
        last = -1
        while True:
            rows = self._query(
                "SELECT image_id, vector FROM images WHERE image_id > ? ORDER BY image_id LIMIT ?",
                (last, batch),
            )
            if not rows:
                return
            ids = np.array([row[0] for row in rows], dtype=np.int64)
            vectors = np.stack([np.frombuffer(row[1], dtype=np.float32) for row in rows])
            yield ids, vectors
            last = int(ids[-1])

    def vectors_by_id(self, image_ids: Sequence[int], batch: int = VECTOR_BATCH) -> np.ndarray:
        """The stored vectors of ``image_ids``, in that order (all ids must exist)."""
        rows: dict[int, bytes] = {}
        wanted = [int(i) for i in image_ids]
        for start in range(0, len(wanted), batch):
            chunk = wanted[start:start + batch]
            marks = ",".join("?" * len(chunk))
            rows.update(self._query(
                f"SELECT image_id, vector FROM images WHERE image_id IN ({marks})", chunk))
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise KeyError(f"no stored vector for image ids {missing[:5]}")
        if not wanted:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([np.frombuffer(rows[i], dtype=np.float32) for i in wanted])

    def sample_image_ids(self, limit: int, seed: int = 0) -> np.ndarray:
        """Up to ``limit`` image ids drawn uniformly without replacement (all if fewer)."""
        ids = np.array([row[0] for row in self._query("SELECT image_id FROM images")],
                       dtype=np.int64)
        if len(ids) <= limit:
            return ids
        return np.sort(np.random.default_rng(seed).choice(ids, limit, replace=False))

    def filtered_image_ids(self, where: dict[str, Any]) -> np.ndarray:
        """Ids of images whose metadata (the image's own, else its item's) equals every
        ``where`` value (AND); a list or tuple value means any of its values (IN).
        ``item_id`` filters on the item itself."""
        clauses, params = [], []
        for key, value in where.items():
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            if not values:
                return np.zeros(0, dtype=np.int64)
            test = "= ?" if len(values) == 1 else f"IN ({', '.join('?' * len(values))})"
            if key == "item_id":
                clauses.append(f"images.item_id {test}")
                params.extend(str(v) for v in values)
                continue
            path = json_path(key)
            clauses.append(
                "CAST(COALESCE(json_extract(images.metadata, ?), json_extract(items.metadata, ?))"
                f" AS TEXT) {test}"
            )
            params.extend([path, path, *(filter_text(v) for v in values)])
        sql = "SELECT images.image_id FROM images JOIN items ON items.item_id = images.item_id" + (
            " WHERE " + " AND ".join(clauses) if clauses else ""
        )
        return np.array([row[0] for row in self._query(sql, params)], dtype=np.int64)

    def metadata_keys(self) -> list[str]:
        rows = self._query(
            "SELECT DISTINCT key FROM items, json_each(items.metadata) "
            "UNION SELECT DISTINCT key FROM images, json_each(images.metadata)"
        )
        return sorted(row[0] for row in rows)

    # -- writes ----------------------------------------------------------------------
    def add_images(self, images: Sequence[NewImage], item_metadata: dict[str, dict], *,
                   model_id: str | None = None) -> list[int]:
        """Insert images (creating or updating their items) in one transaction.

        ``model_id``: the model the vectors come from, checked inside the transaction
        against the stored model id, and every vector against the stored dimension
        (ModelMismatchError, nothing written). Returns the new image ids; an image already
        stored for its item gets id -1.
        """
        now = time.time()
        ids = []
        with self.transaction() as db:
            if model_id is not None:
                self._check_vectors(db, model_id, images)
            for item_id, metadata in item_metadata.items():
                self._upsert_item(db, item_id, metadata, now)
            for image in images:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO images (item_id, path, sha256, box, metadata, vector,"
                    " added) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        image.item_id,
                        image.path,
                        image.sha256,
                        json.dumps(list(image.box)) if image.box else None,
                        json.dumps(image.metadata, sort_keys=True),
                        np.ascontiguousarray(image.vector, dtype=np.float32).tobytes(),
                        now,
                    ),
                )
                ids.append(cursor.lastrowid if cursor.rowcount else -1)
            if any(i != -1 for i in ids):
                self._bump_epoch(db)
        return ids

    @staticmethod
    def _check_vectors(db: sqlite3.Connection, model_id: str, images: Sequence[NewImage]) -> None:
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('model_id', 'dim')"))
        if meta.get("model_id") != model_id:
            raise ModelMismatchError(
                f"vectors from model {model_id!r} cannot go into catalog {_catalog_dir(db)}, "
                f"built with {meta.get('model_id')!r}")
        dim = int(meta["dim"])
        for image in images:
            if np.asarray(image.vector).size != dim:
                raise ModelMismatchError(
                    f"a {np.asarray(image.vector).size}-d vector cannot go into catalog "
                    f"{_catalog_dir(db)}, whose vectors are {dim}-d")

    @staticmethod
    def _upsert_item(db: sqlite3.Connection, item_id: str, metadata: dict, now: float) -> None:
        row = db.execute("SELECT metadata FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO items VALUES (?, ?, ?, ?)",
                (item_id, json.dumps(metadata, sort_keys=True), now, now),
            )
        elif metadata:
            merged = {**json.loads(row[0]), **metadata}
            db.execute(
                "UPDATE items SET metadata = ?, updated = ? WHERE item_id = ?",
                (json.dumps(merged, sort_keys=True), now, item_id),
            )

    def remove_item(self, item_id: str) -> list[int]:
        """Delete an item and its images; returns the removed image ids."""
        with self.transaction() as db:
            ids = [
                r[0]
                for r in db.execute("SELECT image_id FROM images WHERE item_id = ?", (item_id,))
            ]
            db.execute("DELETE FROM images WHERE item_id = ?", (item_id,))
            deleted = db.execute("DELETE FROM items WHERE item_id = ?", (item_id,)).rowcount
            if ids:
                self._bump_epoch(db)
        if not deleted:
            raise KeyError(item_id)
        return ids

    def update_item(self, item_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Set metadata keys on an item (``None`` deletes a key); returns the new metadata.

        The item-level value then applies to all its images, replacing per-image values.
        """
        with self.transaction() as db:
            row = db.execute("SELECT metadata FROM items WHERE item_id = ?", (item_id,)).fetchone()
            if row is None:
                raise KeyError(item_id)
            merged = json.loads(row[0])
            for key, value in metadata.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            db.execute(
                "UPDATE items SET metadata = ?, updated = ? WHERE item_id = ?",
                (json.dumps(merged, sort_keys=True), time.time(), item_id),
            )
            for key in metadata:
                db.execute(
                    "UPDATE images SET metadata = json_remove(metadata, ?) WHERE item_id = ?",
                    (json_path(key), item_id),
                )
        return merged


def _cannot_write(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return any(words in text for words in ("readonly", "read-only", "unable to open"))


def _catalog_dir(db: sqlite3.Connection) -> str:
    """The file of the database behind a connection (for messages)."""
    rows = db.execute("PRAGMA database_list").fetchall()
    return str(Path(rows[0][2]).parent) if rows and rows[0][2] else "(memory)"


def filter_text(value: Any) -> str:
    """A metadata value as filters compare it: text, booleans as ``1``/``0``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)

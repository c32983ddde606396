"""Generations of a Milvus catalog and the switch from one to the next (``vestis adapt
--catalog``): the Milvus analogue of the directory exchange in :mod:`vestis.catalog.reembed`.

A catalog named ``N`` is read through three names, ``N_images``, ``N_items`` and ``N_meta``,
each an alias of a collection of one generation: ``N_g0_images`` … as created,
``N_gK_images`` … after K re-embeddings. A catalog created before generations existed holds
plain collections of those names (read as generation 0, *legacy*). A store reads the
collections the meta name led to when it was opened (its :attr:`prefix`, e.g. ``N_g1``), not
the aliases, so a process that opened the old generation never reads the new vectors with
the old model.

Re-embedding (:class:`MilvusBeside`) builds generation K complete beside the catalog, as a
catalog of its own with plain collections (``N_gK_…``), recording ``milvus_building`` in the
current meta first. Then, under the old store's lock and only if its ``generation`` did not
move, :func:`switch`:

1. the new meta records ``milvus_previous`` (the old generation) and ``milvus_complete``;
2. the three names are pointed at the new collections: images, items, then meta (the commit
   point for vestis: a store finds its catalog through the meta name);
3. the old generation's collections are dropped.

Milvus has no transaction across collections, so the switch rolls forward: a crash before 1
leaves the old catalog untouched (the half-built generation is dropped by the next
re-embedding, which reads ``milvus_building``); from 1 on, opening the catalog
(:func:`recover`, run by every store and by ``exists``) finds its names pointing at different
generations and finishes the switch to the newest complete one, then drops the replaced one.

A legacy catalog is migrated by its first switch: Milvus refuses an alias named like an
existing collection, so each plain collection is dropped just before its alias is made. For
that moment (two calls per name) the name is missing: a reader of another process fails
there, a crash there is finished by :func:`recover` (the name's alias is created). A store
of a legacy catalog reads through those very names, so it checks before each search that its
images name (moved first) is still its own collection.
"""

from __future__ import annotations

import re
from collections.abc import Callable

KINDS = ("images", "items", "meta")
#: Meta keys of the switch (the generation's own meta).
BUILDING, PREVIOUS, COMPLETE = "milvus_building", "milvus_previous", "milvus_complete"
_ZERO = [0.0, 0.0]


def collection(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}"


def generation_of(name: str, prefix: str) -> int:
    """K of ``N_gK``; 0 for a legacy catalog (``N`` itself); -1 for another name."""
    if prefix == name:
        return 0
    match = re.fullmatch(re.escape(name) + r"_g(\d+)", prefix)
    return int(match.group(1)) if match else -1


def target(client, name: str) -> str | None:
    """The collection ``name`` reads: itself (a collection), its alias's, or None."""
    if not client.has_collection(name):
        return None
    return client.describe_collection(name)["collection_name"]


def current_prefix(client, name: str) -> str | None:
    """The generation the catalog's meta name reads (``N_gK``, or ``N`` when legacy)."""
    found = target(client, collection(name, "meta"))
    return None if found is None else found[: -len("_meta")]


def point(client, name: str, kind: str, prefix: str) -> None:
    """Make ``N_<kind>`` an alias of ``<prefix>_<kind>`` (a legacy collection of that name is
    dropped first: Milvus refuses the alias while it exists)."""
    alias, wanted = collection(name, kind), collection(prefix, kind)
    now = target(client, alias)
    if now == wanted:
        return
    if now == alias:
        client.drop_collection(alias)
        now = None
    if now is None:
        client.create_alias(wanted, alias)
    else:
        client.alter_alias(wanted, alias)


def name_if_missing(client, name: str, kind: str, prefix: str) -> None:
    """A new catalog's name for its collection (made once: a store opening the catalog
    never moves a name, so one that opened just before a switch cannot undo it)."""
    if target(client, collection(name, kind)) is None:
        client.create_alias(collection(prefix, kind), collection(name, kind))


def meta_value(client, prefix: str, key: str) -> str | None:
    name = collection(prefix, "meta")
    if not client.has_collection(name):
        return None
    if "Loaded" not in str(client.get_load_state(name).get("state", "")):
        client.load_collection(name)
    rows = client.get(name, ids=[key], output_fields=["value"])
    return rows[0]["value"] if rows else None


def put_meta(client, prefix: str, values: dict[str, str]) -> None:
    client.upsert(collection(prefix, "meta"),
                  [{"key": k, "value": str(v), "v": _ZERO} for k, v in values.items()])


def drop_generation(client, name: str, prefix: str) -> None:
    """Drop a generation's collections, never one that a name of the catalog reads."""
    if not prefix or generation_of(name, prefix) < 0:
        return
    used = {target(client, collection(name, kind)) for kind in KINDS}
    for kind in KINDS:
        found = collection(prefix, kind)
        if found not in used and target(client, found) == found:
            client.drop_collection(found)


def finish(client, name: str, prefix: str) -> None:
    """Point every name at generation ``prefix`` (images, items, meta), then drop the
    generation it replaced."""
    for kind in KINDS:
        point(client, name, kind, prefix)
    previous = meta_value(client, prefix, PREVIOUS)
    if previous and previous != prefix:
        drop_generation(client, name, previous)


def switch(client, name: str, prefix: str, previous: str) -> None:
    """Switch catalog ``name`` from generation ``previous`` to the complete ``prefix``."""
    for kind in KINDS:
        if not client.has_collection(collection(prefix, kind)):
            raise ValueError(f"generation {prefix} of Milvus catalog {name} has no {kind}: "
                             "nothing was switched")
    put_meta(client, prefix, {PREVIOUS: previous, COMPLETE: "1"})
    finish(client, name, prefix)


def recover(client, name: str) -> None:
    """After a crash during a switch (names pointing at different generations, or one
    missing): finish it, to the newest complete generation a name points at; and drop a
    replaced generation a crash left behind."""
    aliased = set()
    for kind in KINDS:
        found = target(client, collection(name, kind))
        if found not in (None, collection(name, kind)):
            aliased.add(found[: -len(kind) - 1])
    complete = [p for p in aliased if meta_value(client, p, COMPLETE) == "1"]
    if complete:
        finish(client, name, max(complete, key=lambda p: generation_of(name, p)))


def next_prefix(client, name: str, current: str, building: str | None) -> str:
    """A generation number above the current one and the last one built, whose collections
    do not exist (another catalog may be named like one)."""
    number = max(generation_of(name, current), generation_of(name, building or "")) + 1
    while any(client.has_collection(collection(f"{name}_g{number}", kind)) for kind in KINDS):
        number += 1
    return f"{name}_g{number}"


def pointed_at(client, name: str, prefix: str) -> bool:
    """Whether a name of the catalog reads generation ``prefix``."""
    return any(target(client, collection(name, kind)) == collection(prefix, kind)
               for kind in KINDS)


class MilvusBeside:
    """Where :func:`vestis.catalog.reembed.reembed` builds a Milvus catalog's next
    generation, and how it switches to it (the module docstring). ``swap``: replaces
    :func:`switch` (given the new generation's location and the catalog's), for tests."""

    link_dir = None  # files stay in the catalog's files directory, which does not change

    def __init__(self, old, swap: Callable[[str, str], None] | None = None):
        from vestis.catalog.milvus import MilvusLocation

        self.store = old._store
        self.client, self.name = self.store.raw_client, self.store.location.name
        building = self.store.get_meta(BUILDING)
        if building and not pointed_at(self.client, self.name, building):
            drop_generation(self.client, self.name, building)  # a killed run's
        self.prefix = next_prefix(self.client, self.name, self.store.prefix, building)
        with self.store.writing():
            self.store._put_meta({BUILDING: self.prefix})
        self.location = MilvusLocation(self.store.location.text).with_name(self.prefix)
        self._swap = swap

    def new_catalog(self, model: str, index: str):
        """The new generation, empty: a catalog of its own with plain collections."""
        from vestis.catalog.catalog import Catalog
        from vestis.catalog.milvus import MilvusStore

        return Catalog(self.location, model=model, index=index,
                       store=lambda: MilvusStore(self.location, aliased=False))

    def swap(self) -> None:
        if self._swap is not None:
            self._swap(self.location, self.store.location.text)
        else:
            switch(self.client, self.name, self.prefix, self.store.prefix)

    def discard(self) -> None:
        """Drop the new generation unless a name reads it (switched, or a switch cut short
        that opening the catalog finishes)."""
        if not pointed_at(self.client, self.name, self.prefix):
            drop_generation(self.client, self.name, self.prefix)

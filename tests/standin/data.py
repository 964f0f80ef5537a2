"""What ArangoDB persists: databases, collections, documents, and the tick counter.

All of it survives `StandIn.restart()`, as on a real server. The tick counter
is the server-wide id source (`TRI_NewTickServer`): job ids, cursor ids,
collection and database ids and document ids all draw from it, so job ids
increase with gaps. Revisions (`_rev`) are hybrid-logical-clock values, as in
ArangoDB, encoded in its own base64 alphabet.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

HLC_ALPHABET = "-_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
KEY_PATTERN = re.compile(r"[a-zA-Z0-9_\-:.@()+,=;$!*'%]{1,254}")
COLLECTION_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_\-]{0,255}")
DATABASE_NAME = re.compile(r"[^/:\x00-\x1f\s][^/:\x00-\x1f]{0,127}")

Document = dict[str, Any]


class Ticks:
    """Strictly increasing, never 0, shared by every id allocation."""

    def __init__(self, first: int = 10_000) -> None:
        self._last = first - 1
        self._last_hlc = 0

    def next(self) -> int:
        self._last += 1
        return self._last

    def revision(self) -> str:
        # HybridLogicalClock: milliseconds << 20 plus a counter, never going back
        self._last_hlc = max(self._last_hlc + 1, int(time.time() * 1000) << 20)
        value, encoded = self._last_hlc, ""
        while value:
            encoded = HLC_ALPHABET[value & 0x3F] + encoded
            value >>= 6
        return encoded


@dataclass
class Collection:
    id: int
    name: str
    type: int = 2
    wait_for_sync: bool = False
    documents: dict[str, Document] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "status": 3,
            "type": self.type,
            "isSystem": self.name.startswith("_"),
            "globallyUniqueId": f"h{self.id:x}/{self.id}",
        }


@dataclass
class Database:
    id: int
    name: str
    collections: dict[str, Collection] = field(default_factory=dict)


class Conflict(Exception):
    """A unique-constraint violation on `_key` (errorNum 1210)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    @property
    def message(self) -> str:
        return (
            "unique constraint violated - in index primary of type primary "
            f"over '_key'; conflicting key: {self.key}"
        )


class BadKey(Exception):
    """An illegal `_key` (errorNum 1221)."""


class Store:
    def __init__(self, ticks: Ticks) -> None:
        self.ticks = ticks
        self.databases: dict[str, Database] = {"_system": Database(1, "_system")}
        # (db, collection, key) -> inserts really executed, including refused ones
        self.writes: Counter[tuple[str, str, str]] = Counter()
        # time.monotonic() of every write of a key (one clock for every process
        # on the machine): when a repeated write ran, and when it ran first
        self.write_times: dict[tuple[str, str, str], list[float]] = {}

    def create_database(self, name: str) -> Database:
        database = Database(self.ticks.next(), name)
        self.databases[name] = database
        return database

    def create_collection(
        self, database: Database, name: str, type_: int, wait_for_sync: bool
    ) -> Collection:
        collection = Collection(self.ticks.next(), name, type_, wait_for_sync)
        database.collections[name] = collection
        return collection

    def insert(
        self, database: str, collection: Collection, doc: Document, overwrite_mode: str = "conflict"
    ) -> tuple[Document, Document | None]:
        """Store `doc`; returns (new document, old document or None).

        Raises `Conflict` for an existing key (unless the overwrite mode allows
        it) and `BadKey`. Each attempt with a usable key counts as a write.
        """
        local_id = self.ticks.next()  # RocksDB's LocalDocumentId takes a tick
        key = doc.get("_key")
        if key is None:
            key = str(local_id)  # the traditional key generator
        elif not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise BadKey
        self.writes[(database, collection.name, key)] += 1
        self.write_times.setdefault((database, collection.name, key), []).append(time.monotonic())
        old = collection.documents.get(key)
        if old is not None:
            if overwrite_mode == "ignore":
                return old, None
            if overwrite_mode == "update":
                return self.store(collection, key, merge(old, doc)), old
            if overwrite_mode != "replace":
                raise Conflict(key)
        return self.store(collection, key, doc), old

    def store(self, collection: Collection, key: str, doc: Document) -> Document:
        body = {k: v for k, v in doc.items() if k not in ("_key", "_id", "_rev")}
        new = {
            "_key": key,
            "_id": f"{collection.name}/{key}",
            "_rev": self.ticks.revision(),
            **body,
        }
        collection.documents[key] = new
        return new


def merge(old: Document, patch: Document, keep_null: bool = True) -> Document:
    """`mergeObjects: true`: objects are merged recursively, everything else replaced."""
    merged = dict(old)
    for name, value in patch.items():
        if value is None and not keep_null:
            merged.pop(name, None)
        elif isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = merge(merged[name], value, keep_null)
        else:
            merged[name] = value
    return merged

"""`/_api/cursor`: run a query, hand out its result in batches (spec §12.5-12.7).

A cursor exists only while results remain (or, with `allowRetry`, until it is
deleted or expires), lives `ttl` seconds after its last use, and is lost on
restart like every other in-memory object of ArangoDB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tests.standin.aql import AqlError, Query
from tests.standin.call import Call, uint64
from tests.standin.data import Store
from tests.standin.documents import parse_json
from tests.standin.reply import METHOD_NOT_ALLOWED, Reply, handler_error, json_reply

DEFAULT_BATCH_SIZE = 1000
DEFAULT_TTL = 30.0
CURSOR_NOT_FOUND = handler_error(404, 1600, "cursor not found")


@dataclass
class Cursor:
    id: int
    rest: list[Any]
    batch_size: int
    count: int | None
    allow_retry: bool
    ttl: float
    expires: float
    batch_id: int = 1  # the batch most recently handed out
    last_batch: dict[str, Any] | None = None

    def touch(self) -> None:
        self.expires = time.monotonic() + self.ttl

    def next_batch(self) -> dict[str, Any]:
        """The next batch's body, without code/error (those depend on the call)."""
        batch, self.rest = self.rest[: self.batch_size], self.rest[self.batch_size :]
        return self.body(batch)

    def body(self, batch: list[Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {"result": batch, "hasMore": bool(self.rest)}
        if self.rest:
            doc["id"] = str(self.id)
            doc["nextBatchId"] = str(self.batch_id + 1)
        if self.count is not None:
            doc["count"] = self.count
        return doc


class CursorApi:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.cursors: dict[int, Cursor] = {}

    def _find(self, text: str) -> Cursor | None:
        cursor = self.cursors.get(uint64(text))
        if cursor is not None and cursor.expires < time.monotonic():
            del self.cursors[cursor.id]
            return None
        return cursor

    async def handle(self, call: Call) -> Reply:
        if call.method == "POST" and not call.suffixes:
            return await self._create(call)
        if call.method in ("POST", "PUT") and len(call.suffixes) in (1, 2):
            return self._more(call)
        if call.method == "DELETE":
            if len(call.suffixes) != 1:
                return handler_error(400, 400, "expecting DELETE /_api/cursor/<cursor-id>")
            cursor = self._find(call.suffixes[0])
            if cursor is None:
                return CURSOR_NOT_FOUND
            del self.cursors[cursor.id]
            return json_reply(202, {"id": str(cursor.id), "error": False, "code": 202})
        if call.method in ("POST", "PUT"):
            return handler_error(400, 400, "bad parameter")
        return METHOD_NOT_ALLOWED

    async def _create(self, call: Call) -> Reply:
        body = parse_json(call)
        if isinstance(body, Reply):
            return body
        if not isinstance(body, dict):
            return handler_error(400, 600, "invalid JSON object")
        text = body.get("query")
        if not isinstance(text, str) or not text.strip():
            return handler_error(400, 1502, "query is empty")
        batch_size = body.get("batchSize", DEFAULT_BATCH_SIZE)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            batch_size = DEFAULT_BATCH_SIZE
        if batch_size == 0:
            return handler_error(400, 17, "expecting non-zero value for <batchSize>")
        bind_vars = body.get("bindVars") or {}
        if not isinstance(bind_vars, dict):
            return handler_error(400, 1550, "invalid structure of bind parameters")
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        assert isinstance(options, dict)
        ttl = body.get("ttl")
        ttl = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else DEFAULT_TTL
        self.store.ticks.next()  # every query gets an id
        try:
            outcome = await Query(text, bind_vars).run(self.store, call.database, call.killed)
        except AqlError as error:
            return handler_error(error.status, error.error_num, error.message)
        cursor = Cursor(
            id=0,
            rest=outcome.result,
            batch_size=max(batch_size, 1),
            count=len(outcome.result) if body.get("count") is True else None,
            allow_retry=options.get("allowRetry") is True,
            ttl=ttl,
            expires=0.0,
        )
        first = cursor.rest[: cursor.batch_size]
        cursor.rest = cursor.rest[cursor.batch_size :]
        if cursor.rest:
            cursor.id = self.store.ticks.next()
            cursor.touch()
            self.cursors[cursor.id] = cursor
        doc = cursor.body(first)
        doc["extra"] = {"warnings": outcome.warnings, "stats": outcome.stats()}
        doc.update({"cached": False, "error": False, "code": 201})
        cursor.last_batch = doc
        return json_reply(201, doc)

    def _more(self, call: Call) -> Reply:
        cursor = self._find(call.suffixes[0])
        if cursor is None:
            return CURSOR_NOT_FOUND
        if len(call.suffixes) == 2:
            wanted = uint64(call.suffixes[1])
            if wanted == cursor.batch_id and cursor.allow_retry and cursor.last_batch:
                cursor.touch()
                return json_reply(200, {**cursor.last_batch, "code": 200})
            if wanted != cursor.batch_id + 1 or not cursor.rest:
                return handler_error(400, 400, "batch id not found")
        if not cursor.rest:
            return CURSOR_NOT_FOUND
        cursor.batch_id += 1
        doc = cursor.next_batch()
        doc.update({"cached": False, "error": False, "code": 200})
        cursor.last_batch = doc
        if cursor.rest or cursor.allow_retry:
            cursor.touch()
        else:
            del self.cursors[cursor.id]
        return json_reply(200, doc)

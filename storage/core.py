"""The job store's state and plumbing, shared by its parts.

`JobStore` (storage.store) is one object in four modules, split by who calls
what: this core holds the state (the writer, the reader, the counts and the
copies in memory, storage.memory) and the ways to read and write;
`storage.dispatching` is the dispatcher's and harvester's side, `storage.facade`
the job facade's and retention's, and `storage.store` opens the store and takes
new jobs in. The store's overview is storage.store's docstring.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar, cast

import aiosqlite

from storage import rows
from storage.batch import OnCommit, Result, Statement, Want
from storage.errors import ResultTooLarge, StoreError
from storage.folder import DataFolder
from storage.limits import SizeLimit
from storage.memory import Fresh, Pending, Ready
from storage.records import JobMode, JobState, StoredResponse
from storage.writer import Writer

T = TypeVar("T")

# SQLite keeps at most 10**9 bytes in a row (SQLITE_MAX_LENGTH, as built by default): a
# result, with the done job's other columns (its target is at most 16 MiB, the most
# proxy.config allows for header fields), must fit. A larger one would fail its
# write, and every write batched with it, at each try.
RESULT_MOST = 10**9 - 32 * 1024 * 1024


class Unknown(Enum):
    """What the copies in memory cannot tell (`state_now`, `take_result_now`): the
    file must be read."""

    UNKNOWN = "unknown"


UNKNOWN = Unknown.UNKNOWN


class StoreCore:
    """What the parts of `JobStore` share; see the module's docstring."""

    def __init__(
        self,
        folder: DataFolder,
        writer_db: aiosqlite.Connection,
        reader_db: aiosqlite.Connection,
        *,
        next_id: int,
        unfinished: int,
        result_bytes: int,
        capacity: int,
        size_limit: tuple[SizeLimit, int] | None = None,
    ) -> None:
        self._folder = folder
        self._reader = reader_db
        self._size_limit = size_limit[0] if size_limit else None
        self._writer = Writer(writer_db, measure=size_limit is not None)
        if size_limit is not None:
            self._writer.used_pages = size_limit[1]
        self._next_id = next_id
        self._unfinished = unfinished
        self._result_bytes = result_bytes
        self._result_listener: Callable[[], None] | None = None
        self._queued_accepts = 0  # enqueued, neither committed nor failed yet
        self._queued_bytes = 0  # the request bodies of those
        self._taken: set[int] = set()  # results handed out, deletes not committed yet
        # jobs a take is reading in the file now (how many takes): no copy in memory
        # answers a take of them meanwhile (JobStore.take_result_now)
        self._claiming: Counter[int] = Counter()
        self._ready = Ready()  # accepted jobs, for the dispatcher (storage.memory)
        self._ready.complete = unfinished == 0  # else the dispatcher's first look reads
        self._fresh = Fresh()  # results not fetched yet, for the facade
        self._pending = Pending()  # unfinished jobs' owners and states, for the facade
        # Cancels of accepted jobs (`cancel_accepted`): the ids the dispatcher holds
        # that have not left state accepted, the cancels that wait for one of those to
        # be marked submitted or given back, and the jobs whose cancel is being written
        # (not handed out meanwhile).
        self._sending: set[int] = set()
        self._cancels: dict[int, StoredResponse] = {}
        self._withheld: set[int] = set()
        self._unsent: set[int] = set()  # given back, surely not at ArangoDB: next_accepted
        self._capacity = capacity
        self._closed = False

    async def _read(self, query: str, params: dict[str, Any]) -> list[Any]:
        return cast(list[Any], await self._reader_call(fetch_all, query, params))

    async def _reader_call(self, function: Callable[..., T], *args: Any) -> T:
        """`function(connection, *args)` on the reader's thread (aiosqlite has no public
        call for it; see storage.writer)."""
        self._check_open()
        db = self._reader
        try:
            return cast(T, await db._execute(function, db._conn, *args))  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            raise StoreError(f"the job store could not read: {exc}") from exc

    def _removed(self, result: Result) -> None:
        """on_commit of every write that removes or forgets jobs: (id, state, size) rows."""
        for job_id, state, size in cast(list[Any], result):
            if state == JobState.DONE:
                self._result_bytes -= size
                self._fresh.remove(job_id)
            else:
                self._ready.forget(job_id)
                self._pending.remove(job_id)  # forgotten: no one's to see any more

    def _finish_committed(
        self, changed: Result, job_id: int, response: StoredResponse, size: int, taking: int | None
    ) -> None:
        """on_commit of a finish (and of the deletes that finish a job, `Answering`):
        `changed` is [(mode, user, the size of job `taking`'s row if it went)], or []
        if the job was not finished."""
        if taking is not None:
            self._taken.discard(taking)  # gone with this write, or back
            if changed:
                [(_, _, taken_size)] = cast(list[Any], changed)
                if taken_size is not None:
                    self._removed([(taking, JobState.DONE, taken_size)])
        if not changed:
            return
        self._unfinished -= 1
        self._ready.remove(job_id)
        self._sending.discard(job_id)
        self._unsent.discard(job_id)
        self._cancels.pop(job_id, None)  # too late: it is done
        self._pending.remove(job_id)
        [(mode, user, _)] = cast(list[Any], changed)
        if mode == JobMode.STORE:  # a forgotten job's row is gone with its result
            self._result_bytes += size
            if job_id not in self._taken:  # (a read may have claimed it before this ran)
                self._fresh.add(job_id, rows.text_value(user), response, size)
            if self._result_listener is not None:
                self._result_listener()

    def _result_values(self, response: StoredResponse) -> tuple[str, int]:
        """A result's headers as stored, and its size; ResultTooLarge if it can never be
        stored (over SQLite's row or the store's size limit)."""
        headers = rows.headers_param(response.headers)  # ASCII: characters are bytes
        size = len(headers) + len(response.body)
        reason = too_large_for_a_row(size) or (
            self._size_limit and self._size_limit.too_large("a result", size)
        )
        if reason:
            raise ResultTooLarge(reason)
        return headers, size

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the job store is closed")

    async def _write_count(self, *statements: Statement, on_commit: OnCommit | None = None) -> int:
        future = self._writer.enqueue(*statements, want=Want.ROWCOUNT, on_commit=on_commit)
        return cast(int, await future)

    async def _command(
        self, statement: Statement, on_commit: OnCommit | None = None, *, scrubs: bool = False
    ) -> list[Any]:
        """A command's outcome rows (storage.sql, commands)."""
        future = self._writer.enqueue(
            statement, want=Want.OUTCOME, on_commit=on_commit, scrubs=scrubs
        )
        return cast(list[Any], await future)

    async def _write_rows(
        self, *statements: Statement, on_commit: OnCommit | None = None, scrubs: bool = False
    ) -> list[Any]:
        """`scrubs`: the write wipes or removes data (see storage.writer)."""
        future = self._writer.enqueue(
            *statements, want=Want.ROWS, on_commit=on_commit, scrubs=scrubs
        )
        return cast(list[Any], await future)


def too_large_for_a_row(size: int) -> str | None:
    """Why a result of `size` bytes can never be stored (`RESULT_MOST`), or None."""
    if size > RESULT_MOST:
        return f"a result of {size} bytes is larger than SQLite keeps in a row (10^9 bytes)"
    return None


def resolved(value: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def mapped(future: asyncio.Future[Any], convert: Callable[[Any], T]) -> asyncio.Future[T]:
    """A future of `convert(future's result)`, or of its exception; cancelling it
    cancels `future`. (Cheaper than a task that awaits `future`: no coroutine.)"""
    mapped: asyncio.Future[T] = future.get_loop().create_future()

    def settle(done: asyncio.Future[Any]) -> None:
        if mapped.done():
            return
        if done.cancelled():
            mapped.cancel()
        elif (error := done.exception()) is not None:
            mapped.set_exception(error)
        else:
            mapped.set_result(convert(done.result()))

    def cancelled(outcome: asyncio.Future[T]) -> None:
        if outcome.cancelled():
            future.cancel()

    future.add_done_callback(settle)
    mapped.add_done_callback(cancelled)
    return mapped


def sees(viewer: str | None, owner: str) -> bool:
    """Whether `viewer` (None: the superuser) sees a job of `owner` (as VISIBLE)."""
    return viewer is None or viewer == owner


def viewer_param(viewer: str | None) -> str | bytes | None:
    return rows.optional_text_param(viewer)


def listing(viewer: str | None, limit: int) -> dict[str, Any]:
    return {"viewer": viewer_param(viewer), "limit": min(limit, rows.MAX_ID)}


def fetch_all(conn: sqlite3.Connection, query: str, params: dict[str, Any]) -> list[Any]:
    return conn.execute(query, params).fetchall()


def by_id(job_id: int, viewer: str | None) -> dict[str, Any]:
    return {"id": job_id, "viewer": viewer_param(viewer)}

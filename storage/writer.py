"""The single writer: concurrent writes group-committed, one transaction per batch.

Callers ``enqueue`` a write and await the future they get back. The writer task
takes everything queued (at most ``MAX_BATCH`` writes), runs it inside one
``BEGIN IMMEDIATE`` ... ``COMMIT``, and only then resolves the futures: a burst of
concurrent accepts shares one fsync, and a resolved future means committed.

The whole batch runs as one call in aiosqlite's thread (one round-trip through
the event loop, however many statements); inside it, consecutive writes with
the same SQL that need no result go to SQLite as one ``executemany``, writes
that need a rowcount or RETURNING rows run one by one.

Outcome of a batch::

    COMMIT ok      -> commits += 1; each write's on_commit(result); futures get results
    any exception  -> ROLLBACK; each write's on_abort(); futures fail with StoreError
                      (chained); the next batch runs as usual, the fault may have gone
    writer task cancelled mid-batch -> futures fail with StoreError; cancellation goes on

A write whose caller gave up (future cancelled) before its batch started is skipped.

Scrubbing the WAL. ``secure_delete`` zeroes wiped credentials and deleted results in
the database pages, but every earlier version of those pages stays in the -wal file
as a frame until SQLite happens to overwrite it, which on a quiet proxy can be never.
A write enqueued with ``scrubs=True`` (one that wipes or deletes data) therefore asks
for ``PRAGMA wal_checkpoint(TRUNCATE)``: every frame is copied into the database and
the -wal file is cut to zero bytes. It runs between batches, never inside one:

    scrub wanted, queue empty, last attempt >= SCRUB_INTERVAL ago    -> checkpoint now
    scrub wanted, queue busy, wanted for < SCRUB_MAX_DELAY            -> writes first
    scrub wanted, queue busy, wanted for >= SCRUB_MAX_DELAY,
                  last attempt >= SCRUB_INTERVAL ago                 -> checkpoint now

The trade-off: a TRUNCATE checkpoint costs an fsync of the database and a truncation,
and the next commit has to grow the -wal file again, so it is rate-limited and done
when the writer is idle; writes that arrive meanwhile wait for it (milliseconds). In
exchange, wiped secrets leave the files within about SCRUB_INTERVAL of a quiet moment
(at most SCRUB_MAX_DELAY under constant load) instead of whenever SQLite reuses the
space. A checkpoint blocked by a reader ("busy") is simply tried again later.
(Frames a killed process left behind are cleared by ``JobStore.open``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import aiosqlite

from storage.errors import StoreError

MAX_BATCH = 1024
SCRUB_INTERVAL = 1.0  # seconds: least time between two scrubbing checkpoints
SCRUB_MAX_DELAY = 30.0  # seconds: longest a scrub waits for an idle moment
SCRUB_BUSY_TIMEOUT_MS = 100  # how long a scrub waits for readers before trying later

log = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any]
Result = int | list[Any] | None
OnCommit = Callable[[Result], None]
OnAbort = Callable[[], None]


class Want(Enum):
    NOTHING = "nothing"  # result None; consecutive ones with the same SQL share an executemany
    ROWCOUNT = "rowcount"  # result: total rows changed by the write's statements
    ROWS = "rows"  # result: rows returned by the write's statements (RETURNING)


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Params = ()


@dataclass(frozen=True, slots=True, eq=False)
class _Write:
    statements: tuple[Statement, ...]
    want: Want
    future: asyncio.Future[Result]
    on_commit: OnCommit | None
    on_abort: OnAbort | None
    scrubs: bool = False

    def batchable_with(self, other: _Write) -> bool:
        return (
            self.want is Want.NOTHING
            and other.want is Want.NOTHING
            and len(self.statements) == len(other.statements) == 1
            and self.statements[0].sql == other.statements[0].sql
        )


class Writer:
    """Owns the writer connection; nothing else may use it while the task runs."""

    def __init__(self, db: aiosqlite.Connection, *, measure: bool = False) -> None:
        self.db = db
        self.commits = 0
        self.checkpoints = 0  # scrubbing checkpoints that completed
        self.scrub_attempts = 0  # completed or not (a reader in the way)
        # With `measure`, pages in use (page_count - freelist_count) after each commit:
        # the store refuses new jobs near its size limit from this figure.
        self.measure = measure
        self.used_pages = 0
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._closing = False
        self._scrub_wanted_since: float | None = None
        self._last_scrub = time.monotonic()  # JobStore.open has just checkpointed
        self._task = asyncio.create_task(self._run(), name="job-store-writer")

    def enqueue(
        self,
        *statements: Statement,
        want: Want = Want.NOTHING,
        on_commit: OnCommit | None = None,
        on_abort: OnAbort | None = None,
        scrubs: bool = False,
    ) -> asyncio.Future[Result]:
        """Queue one write (its statements run in order, in the same transaction).

        `scrubs`: the write wipes or deletes data that must not linger in the -wal file.
        """
        if self._closing or self._task.done():
            raise StoreError("the job store is closed")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(statements, want, future, on_commit, on_abort, scrubs))
        return future

    async def stop(self) -> None:
        """Commit everything queued so far, then end the task."""
        self._closing = True
        self._queue.put_nowait(None)  # behind every write queued so far
        # wait() rather than await: a task that was cancelled must not raise here.
        await asyncio.wait([self._task])

    async def _run(self) -> None:
        try:
            while True:
                first = await self._next()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                await self._commit(batch)
                if stop:
                    return
        finally:
            # Only a cancelled task leaves writes behind (stop() queues its marker last);
            # their callers must not wait forever.
            self._closing = True
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None:
                    _fail([item], "the job store was stopped before this write ran", None)

    async def _next(self) -> _Write | None:
        """The next queued write, after a scrubbing checkpoint if one is due (see above)."""
        while self._scrub_wanted_since is not None:
            now = time.monotonic()
            wait = self._last_scrub + SCRUB_INTERVAL - now
            if not self._queue.empty():
                # a busy writer checkpoints only when overdue, and never twice in a
                # row (a reader in the way must not starve the queued writes)
                if wait > 0 or now - self._scrub_wanted_since < SCRUB_MAX_DELAY:
                    return self._queue.get_nowait()
            elif wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        return await self._queue.get()
                continue
            await self._scrub()
        return await self._queue.get()

    async def _scrub(self) -> None:
        self.scrub_attempts += 1
        db = self.db
        try:
            done = await db._execute(_checkpoint, db._conn)  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            log.warning("cannot checkpoint the job store's WAL, will retry: %s", exc)
            return
        finally:
            # from the end: a slow (busy) attempt is never followed at once by another
            self._last_scrub = time.monotonic()
        if done:
            self._scrub_wanted_since = None
            self.checkpoints += 1

    async def _commit(self, batch: list[_Write]) -> None:
        live = []
        for write in batch:
            if write.future.cancelled():
                _abort(write)
            else:
                live.append(write)
        if not live:
            return
        try:
            results = await self._in_sqlite_thread(live)
        except Exception as exc:
            _fail(live, f"the job store could not commit {len(live)} write(s): {exc}", exc)
            return
        except BaseException as exc:
            _fail(live, "the job store was stopped in the middle of a write", exc)
            raise
        self.commits += 1
        if self._scrub_wanted_since is None and any(write.scrubs for write in live):
            self._scrub_wanted_since = time.monotonic()
        for write, result in zip(live, results, strict=True):
            if write.on_commit is not None:
                write.on_commit(result)
            if not write.future.done():
                write.future.set_result(result)

    async def _in_sqlite_thread(self, writes: list[_Write]) -> list[Result]:
        """Run the whole batch with one hop to aiosqlite's thread.

        One await per statement would wait for the event loop each time, and a
        loop busy with HTTP makes that a millisecond or more per statement; a
        batch of a hundred writes then held every caller for a hundred loop
        turns. aiosqlite has no public call for "run this function in your
        thread", so its `_execute` is used (aiosqlite is pinned below 0.23).
        """
        db = self.db
        results, used = cast(
            tuple[list[Result], int | None],
            await db._execute(_measured_transaction, db._conn, writes, self.measure),  # type: ignore[no-untyped-call]
        )
        if used is not None:
            self.used_pages = used
        return results


def used_pages(conn: sqlite3.Connection) -> int:
    """Pages of the database file that hold data (free pages are reused first)."""
    [(pages,)] = conn.execute("PRAGMA page_count").fetchall()
    [(free,)] = conn.execute("PRAGMA freelist_count").fetchall()
    return int(pages) - int(free)


def _measured_transaction(
    conn: sqlite3.Connection, writes: list[_Write], measure: bool
) -> tuple[list[Result], int | None]:
    results = _transaction(conn, writes)
    return results, used_pages(conn) if measure else None


def _transaction(conn: sqlite3.Connection, writes: list[_Write]) -> list[Result]:
    """BEGIN, every write, COMMIT; on any error ROLLBACK and raise. In SQLite's thread."""
    if len(writes) == 1 and len(writes[0].statements) == 1:
        # A lone statement is its own transaction in autocommit mode.
        return [_execute_one(conn, writes[0])]
    conn.execute("BEGIN IMMEDIATE")
    try:
        results: list[Result] = []
        start = 0
        while start < len(writes):
            end = start + 1
            while end < len(writes) and writes[start].batchable_with(writes[end]):
                end += 1
            if end - start > 1:
                params = [write.statements[0].params for write in writes[start:end]]
                conn.executemany(writes[start].statements[0].sql, params)
                results.extend([None] * (end - start))
            else:
                results.append(_execute_one(conn, writes[start]))
            start = end
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (e.g. on SQLITE_FULL): then this is a no-op.
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        raise
    return results


def _checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the whole WAL into the database and truncate it; False if a reader was in
    the way. In SQLite's thread. The busy timeout is cut short meanwhile: writes queued
    behind the checkpoint must not wait seconds for a reader; it is tried again later."""
    [(busy_timeout,)] = conn.execute("PRAGMA busy_timeout").fetchall()
    conn.execute(f"PRAGMA busy_timeout = {SCRUB_BUSY_TIMEOUT_MS}")
    try:
        [(busy, _, _)] = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout)}")
    return bool(busy == 0)


def _execute_one(conn: sqlite3.Connection, write: _Write) -> Result:
    count = 0
    rows: list[Any] = []
    for statement in write.statements:
        cursor = conn.execute(statement.sql, statement.params)
        if write.want is Want.ROWS:
            rows.extend(cursor.fetchall())
        else:
            count += cursor.rowcount
    if write.want is Want.ROWS:
        return rows
    return count if write.want is Want.ROWCOUNT else None


def _abort(write: _Write) -> None:
    if write.on_abort is not None:
        write.on_abort()


def _fail(writes: list[_Write], message: str, cause: BaseException | None) -> None:
    for write in writes:
        _abort(write)
        if not write.future.done():
            error = StoreError(message)
            error.__cause__ = cause  # as `raise error from cause` would
            write.future.set_exception(error)

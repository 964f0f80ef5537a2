"""The single writer: concurrent writes group-committed, one transaction per batch.

Callers ``enqueue`` a write and await the future they get back. The writer takes
everything queued (at most ``MAX_BATCH`` writes), runs it inside one
``BEGIN IMMEDIATE`` ... ``COMMIT``, and only then resolves the futures: a burst of
concurrent accepts shares one fsync, and a resolved future means committed.

The writer loop runs on the writer connection's own thread (aiosqlite's, taken for
the writer's whole life), not on the event loop: a batch that commits is followed
at once by the next one, made of whatever was queued meanwhile, and the event loop
gets one callback per batch with every outcome. Had the loop to schedule each
batch, a loop busy with HTTP would add a turn or two (milliseconds) to every
commit, and so to every accept. How a batch runs in SQLite (a few statements
for many writes) is storage.batch's.

Outcome of a batch::

    COMMIT ok      -> commits += 1; on the writer's thread at once, each write's
                      on_durable(); then on the loop each write's on_commit(result),
                      and futures get results
    any exception  -> ROLLBACK; each write's on_abort(); futures fail with StoreError
                      (chained); the next batch runs as usual, the fault may have gone
    stop(), or the writer's task cancelled -> the batch under way finishes (commit or
                      rollback, as above); writes still queued fail with StoreError

A write whose caller gave up (future cancelled) before its batch started is skipped.

Lazy writes. A write enqueued with ``lazy=True`` is one nobody waits for (the delete
of a result its client has fetched): it never starts a commit of its own, but joins
the next batch that another write starts, or starts one after at most LAZY_DELAY.
Under the job API's load a third of the commits were fetched results' deletes
alone, each an fsync and a turn of the writer and of the loop for nothing urgent.
Writes still commit in the order they were enqueued: any other write, a call, or
``stop()`` puts the lazy writes waiting into the queue ahead of itself, and a batch
takes lazy writes only once the queue is empty. (Two lazy writes may swap, when the
loop moves them while the writer's thread takes them: they are deletes of distinct
rows.)

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
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import aiosqlite

from storage.batch import (
    OnAbort,
    OnCommit,
    OnDurable,
    Result,
    Statement,
    Want,
    Write,
    transaction,
)
from storage.errors import StoreError
from storage.records import frozen

MAX_BATCH = 1024
SCRUB_INTERVAL = 1.0  # seconds: least time between two scrubbing checkpoints
SCRUB_MAX_DELAY = 30.0  # seconds: longest a scrub waits for an idle moment
SCRUB_BUSY_TIMEOUT_MS = 100  # how long a scrub waits for readers before trying later
IDLE_CHECK = 1.0  # seconds: an idle writer looks this often whether its loop is gone
LAZY_DELAY = 0.1  # seconds: longest a lazy write waits for a batch to join

log = logging.getLogger(__name__)
T = TypeVar("T")


@frozen(eq=False)
class _Call:
    function: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


class Writer:
    """Owns the writer connection and its thread until stop(); use `call` meanwhile."""

    def __init__(self, db: aiosqlite.Connection, *, measure: bool = False) -> None:
        self.db = db
        self.commits = 0
        self.checkpoints = 0  # scrubbing checkpoints that completed
        self.scrub_attempts = 0  # completed or not (a reader in the way)
        # With `measure`, pages in use (page_count - freelist_count) after each commit:
        # the store refuses new jobs near its size limit from this figure.
        self.measure = measure
        self.used_pages = 0
        self._loop = asyncio.get_running_loop()
        # Shared with the writer thread: deque appends and pops are atomic.
        self._queue: deque[Write | _Call | None] = deque()
        self._lazy: deque[Write] = deque()  # lazy writes: join the next batch
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._wake = threading.Event()
        self._closing = False
        self._scrub_wanted_since: float | None = None  # read and written by the thread only
        self._last_scrub = time.monotonic()  # JobStore.open has just checkpointed
        serving = db._execute(self._serve, db._conn)  # type: ignore[no-untyped-call]
        self._task: asyncio.Future[None] = asyncio.ensure_future(serving)
        self._task.add_done_callback(self._task_done)

    def enqueue(
        self,
        *statements: Statement,
        want: Want = Want.NOTHING,
        on_commit: OnCommit | None = None,
        on_abort: OnAbort | None = None,
        scrubs: bool = False,
        on_durable: OnDurable | None = None,
        lazy: bool = False,
    ) -> asyncio.Future[Result]:
        """Queue one write (its statements run in order, in the same transaction).

        `scrubs`: the write wipes or deletes data that must not linger in the -wal file.
        `lazy`: nobody waits for it; it joins the next batch (see above).
        `on_durable`: called on the writer's thread as soon as the write has committed,
        before the event loop hears of it (a turn of a busy loop later): for work that
        must wait for the commit and need not wait for the loop. It must be quick,
        and it is not called if the batch fails.
        """
        if len(statements) == 1:  # (the common case, without a generator)
            rows = statements[0].values is not None
        else:
            rows = any(statement.values for statement in statements)
        if (rows or want is Want.OUTCOME) and (
            len(statements) != 1 or not rows or want not in (Want.NOTHING, Want.OUTCOME)
        ):
            raise ValueError(
                "a statement with a values group is a write of its own, wanting nothing or"
                " its outcome (a command: such a statement)"
            )
        future: asyncio.Future[Result] = self._loop.create_future()
        write = Write(statements, want, future, on_commit, on_abort, scrubs, on_durable)
        if lazy:
            self._put_lazy(write)
        else:
            self._put(write)
        return future

    def call(self, function: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `function(connection)` on the writer's thread between two batches."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._put(_Call(function, future))
        return future

    async def execute_fetchall(self, sql: str) -> list[Any]:
        """One statement between two batches, outside their transactions; its rows."""
        return await self.call(lambda conn: conn.execute(sql).fetchall())

    def _put(self, item: Write | _Call) -> None:
        if self._closing:
            raise StoreError("the job store is closed")
        if self._lazy:  # ahead of this one: a write commits after every write before it
            self._queue_lazy()
        self._queue.append(item)
        if not self._wake.is_set():  # the thread clears it before it looks at the queue
            self._wake.set()

    def _put_lazy(self, write: Write) -> None:
        if self._closing:
            raise StoreError("the job store is closed")
        self._lazy.append(write)
        if self._lazy_timer is None:
            self._lazy_timer = self._loop.call_later(LAZY_DELAY, self._lazy_due)

    def _lazy_due(self) -> None:
        """No batch took the lazy writes in time: they start one."""
        self._lazy_timer = None
        self._queue_lazy()
        if not self._wake.is_set():
            self._wake.set()

    def _queue_lazy(self) -> None:
        """Move the lazy writes to the queue. (The writer's thread may take some of
        them meanwhile: each pop is atomic, so each write goes one way only.)"""
        while True:
            try:
                write = self._lazy.popleft()
            except IndexError:
                return
            self._queue.append(write)

    async def stop(self) -> None:
        """Commit everything queued so far, then end the thread's loop."""
        self._stop()
        # wait() rather than await: a task that was cancelled must not raise here.
        await asyncio.wait([self._task])

    def _stop(self) -> None:
        if not self._closing:
            self._closing = True
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
            self._queue_lazy()
            self._queue.append(None)  # behind every write queued so far
            self._wake.set()

    def _task_done(self, task: asyncio.Future[None]) -> None:
        # Cancelled (asyncio.run() cancels what is left at exit): the thread runs on
        # until it sees the stop marker, and must be told.
        self._stop()

    # -- on the writer's thread ----------------------------------------------------------

    def _serve(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                batch = self._next_batch(conn)
                if batch is None:
                    return
                if isinstance(batch, _Call):
                    self._run_call(conn, batch)
                else:
                    self._commit(conn, batch)
        finally:
            # Everything queued behind the stop marker (or left by a fault here) fails;
            # its callers must not wait forever.
            self._closing = True
            left = [item for item in self._queue if isinstance(item, Write)]
            left.extend(self._lazy)
            self._queue.clear()
            self._lazy.clear()
            if left:
                self._post(_fail, left, "the job store was stopped before this write ran", None)

    def _next_batch(self, conn: sqlite3.Connection) -> list[Write] | _Call | None:
        """Writes to commit together, a call, or None at the stop marker; waits for work
        and checkpoints when a scrub is due (see above)."""
        while True:
            self._wake.clear()
            if self._scrub_wanted_since is not None and self._scrub_due():
                self._scrub(conn)
                continue
            if not self._queue:
                if self._loop.is_closed():
                    return None  # the store was never closed: do not keep the process alive
                timeout = IDLE_CHECK
                if self._scrub_wanted_since is not None:
                    timeout = max(0.0, self._last_scrub + SCRUB_INTERVAL - time.monotonic())
                self._wake.wait(min(timeout, IDLE_CHECK))
                continue
            first = self._queue.popleft()
            if first is None or isinstance(first, _Call):
                return first
            batch = [first]
            while self._queue and len(batch) < MAX_BATCH:
                item = self._queue[0]
                if not isinstance(item, Write):
                    break  # a call or the stop marker: after this batch
                self._queue.popleft()
                batch.append(item)
            # the lazy writes last (the runs of one statement above stay whole), and
            # not past a call: a write queued before the call commits before them
            while len(batch) < MAX_BATCH and not self._queue:
                try:
                    batch.append(self._lazy.popleft())
                except IndexError:  # (none left, or the loop moved them to the queue)
                    break
            return batch

    def _scrub_due(self) -> bool:
        assert self._scrub_wanted_since is not None
        now = time.monotonic()
        if now - self._last_scrub < SCRUB_INTERVAL:
            return False
        # a busy writer checkpoints only when overdue, and never twice in a row
        # (a reader in the way must not starve the queued writes)
        return not self._queue or now - self._scrub_wanted_since >= SCRUB_MAX_DELAY

    def _scrub(self, conn: sqlite3.Connection) -> None:
        self.scrub_attempts += 1
        try:
            done = _checkpoint(conn)
        except sqlite3.Error as exc:
            log.warning("cannot checkpoint the job store's WAL, will retry: %s", exc)
            return
        finally:
            # from the end: a slow (busy) attempt is never followed at once by another
            self._last_scrub = time.monotonic()
        if done:
            self._scrub_wanted_since = None
            self.checkpoints += 1

    def _commit(self, conn: sqlite3.Connection, batch: list[Write]) -> None:
        # One look at each future: a caller may cancel at any moment from the loop's
        # thread, and a write must land in exactly one of the two lists.
        live: list[Write] = []
        skipped: list[Write] = []
        for write in batch:
            (skipped if write.future.cancelled() else live).append(write)
        if not live:
            self._post(_settle, skipped, [], [])
            return
        try:
            results = transaction(conn, live)
        except Exception as exc:
            self._post(
                _fail, batch, f"the job store could not commit {len(live)} write(s): {exc}", exc
            )
            return
        _durable(live)
        if self.measure:
            # (committed whatever this says: a failure keeps the last figure)
            with contextlib.suppress(sqlite3.Error):
                self.used_pages = used_pages(conn)
        self.commits += 1
        if self._scrub_wanted_since is None and any(write.scrubs for write in live):
            self._scrub_wanted_since = time.monotonic()
        self._post(_settle, skipped, live, results)

    def _run_call(self, conn: sqlite3.Connection, call: _Call) -> None:
        try:
            result = call.function(conn)
        except Exception as exc:
            self._post(_set_exception, call.future, exc)
            return
        self._post(_set_result, call.future, result)

    def _post(self, function: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(function, *args)


def used_pages(conn: sqlite3.Connection) -> int:
    """Pages of the database file that hold data (free pages are reused first)."""
    [(pages,)] = conn.execute("PRAGMA page_count").fetchall()
    [(free,)] = conn.execute("PRAGMA freelist_count").fetchall()
    return int(pages) - int(free)


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


def _durable(live: list[Write]) -> None:
    """On the writer's thread: a batch committed."""
    for write in live:
        if write.on_durable is not None:
            try:
                write.on_durable()
            except Exception:
                log.exception("a commit's on_durable failed")


def _settle(skipped: list[Write], live: list[Write], results: list[Result]) -> None:
    """On the loop: a batch committed. A callback that fails is logged and the rest
    go on: every future of the batch is resolved, each write did commit."""
    for write in skipped:
        _abort(write)
    for write, result in zip(live, results, strict=True):
        if write.on_commit is not None:
            try:
                write.on_commit(result)
            except Exception:
                log.exception("a commit's on_commit failed")
        if not write.future.done():
            write.future.set_result(result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _abort(write: Write) -> None:
    if write.on_abort is not None:
        try:
            write.on_abort()
        except Exception:
            log.exception("a write's on_abort failed")


def _fail(writes: list[Write], message: str, cause: BaseException | None) -> None:
    for write in writes:
        _abort(write)
        if not write.future.done():
            error = StoreError(message)
            error.__cause__ = cause  # as `raise error from cause` would
            write.future.set_exception(error)

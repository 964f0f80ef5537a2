"""The single writer: concurrent writes group-committed, one transaction per batch.

Callers ``enqueue`` a write and await the future they get back. The writer task
takes everything queued (at most ``MAX_BATCH`` writes), runs it inside one
``BEGIN IMMEDIATE`` ... ``COMMIT``, and only then resolves the futures: a burst of
concurrent accepts shares one fsync, and a resolved future means committed.

Each aiosqlite call is a thread round-trip (~0.1 ms), so consecutive writes with
the same SQL that need no result go to SQLite as one ``executemany``; writes that
need a rowcount or RETURNING rows run one by one.

Outcome of a batch::

    COMMIT ok      -> commits += 1; each write's on_commit(result); futures get results
    any exception  -> ROLLBACK; each write's on_abort(); futures fail with StoreError
                      (chained); the next batch runs as usual, the fault may have gone
    writer task cancelled mid-batch -> futures fail with StoreError; cancellation goes on

A write whose caller gave up (future cancelled) before its batch started is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiosqlite

from storage.errors import StoreError

MAX_BATCH = 1024

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

    def batchable_with(self, other: _Write) -> bool:
        return (
            self.want is Want.NOTHING
            and other.want is Want.NOTHING
            and len(self.statements) == len(other.statements) == 1
            and self.statements[0].sql == other.statements[0].sql
        )


class Writer:
    """Owns the writer connection; nothing else may use it while the task runs."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.commits = 0
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="job-store-writer")

    def enqueue(
        self,
        *statements: Statement,
        want: Want = Want.NOTHING,
        on_commit: OnCommit | None = None,
        on_abort: OnAbort | None = None,
    ) -> asyncio.Future[Result]:
        """Queue one write (its statements run in order, in the same transaction)."""
        if self._closing or self._task.done():
            raise StoreError("the job store is closed")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(statements, want, future, on_commit, on_abort))
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
                first = await self._queue.get()
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
            if len(live) == 1 and len(live[0].statements) == 1:
                # A lone statement is its own transaction in autocommit mode: two
                # round-trips fewer for the write that has the writer to itself.
                results = [await self._execute_one(live[0])]
            else:
                await self.db.execute("BEGIN IMMEDIATE")
                results = await self._execute(live)
                await self.db.execute("COMMIT")
        except Exception as exc:
            # SQLite may already have rolled back (e.g. on SQLITE_FULL); rollback() is then
            # a no-op. If it fails too, the next batch's failure path tries again.
            with contextlib.suppress(sqlite3.Error):
                await self.db.rollback()
            _fail(live, f"the job store could not commit {len(live)} write(s): {exc}", exc)
            return
        except BaseException as exc:
            _fail(live, "the job store was stopped in the middle of a write", exc)
            raise
        self.commits += 1
        for write, result in zip(live, results, strict=True):
            if write.on_commit is not None:
                write.on_commit(result)
            if not write.future.done():
                write.future.set_result(result)

    async def _execute(self, writes: list[_Write]) -> list[Result]:
        results: list[Result] = []
        start = 0
        while start < len(writes):
            end = start + 1
            while end < len(writes) and writes[start].batchable_with(writes[end]):
                end += 1
            if end - start > 1:
                params = [write.statements[0].params for write in writes[start:end]]
                await self.db.executemany(writes[start].statements[0].sql, params)
                results.extend([None] * (end - start))
            else:
                results.append(await self._execute_one(writes[start]))
            start = end
        return results

    async def _execute_one(self, write: _Write) -> Result:
        count = 0
        rows: list[Any] = []
        for statement in write.statements:
            if write.want is Want.ROWS:
                rows.extend(await self.db.execute_fetchall(statement.sql, statement.params))
            else:
                cursor = await self.db.execute(statement.sql, statement.params)
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

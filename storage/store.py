"""JobStore: the durable job store the proxy talks to, on one SQLite file.

Writes go through the single group-committing writer (``storage.writer``); reads
use a second, read-only connection, which in WAL mode sees every committed write
and never blocks the writer. Every state transition is one statement (or, for a
delete that may either remove or forget a job, two; and a delete run as a job for
the job API finishes that job in the same transaction: `Answering`) in one
transaction.

Visibility: the job facade's methods see only jobs in mode ``store``; a viewer of
``None`` (superuser) sees every user's jobs, a string only the jobs of that user.
A job deleted while unfinished is *forgotten* (mode ``true``): it runs on, and
``finish`` deletes it instead of storing its result (the schema's trigger).

Credentials and results that are wiped or deleted are zeroed in place
(``secure_delete``) and, soon after, cleared from the -wal file as well (the
writer's scrubbing checkpoint, ``storage.writer``; every write that wipes or
removes data passes ``scrubs=True``).

``unfinished`` counts jobs in state accepted or submitted. It is kept in memory,
read once at open, and changed only by the writer right after a commit, so it is
exact even when a caller is cancelled while its write commits. ``result_bytes``,
the total size of the stored results (response headers and body), is kept the
same way: summed once at open over the done jobs' covering index (about 55 ms
per million stored results), then changed by the sizes that the writes which
store or remove results return. Summing it again per question would cost that
55 ms every time the byte cap is checked, i.e. after every harvest.

The dispatcher's accepted jobs, the facade's unfetched results and the owners and
states of unfinished jobs are also kept in memory, within small budgets
(``storage.memory``), updated by the commit callbacks: ``next_accepted``, ``state``
and ``take_result`` read the file only for what those copies do not hold.

One class in four modules, by who calls what: here opening, closing and the
intake (``accept``); ``storage.dispatching`` the dispatcher's and harvester's
side; ``storage.facade`` the job facade's and retention's; ``storage.core`` the
state and the ways to read and write that they share.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from storage import rows, schema, sql
from storage.batch import OUTCOME_TABLE, Statement
from storage.core import UNKNOWN, Unknown
from storage.dispatching import Dispatching
from storage.errors import CapacityExceeded, StoreError
from storage.facade import Facade
from storage.folder import DataFolder
from storage.limits import SizeLimit
from storage.records import Job, NewJob

SYNCHRONOUS = ("FULL", "NORMAL")
BUSY_TIMEOUT_MS = 5000

__all__ = ["UNKNOWN", "JobStore", "Unknown"]


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: the writer issues BEGIN IMMEDIATE/COMMIT itself, and reads
    # run in autocommit so each one sees the newest commit.
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


class JobStore(Dispatching, Facade):
    """Open with ``await JobStore.open(folder)``; close with ``await store.close()``."""

    @classmethod
    async def open(
        cls,
        folder: Path,
        *,
        synchronous: str = "FULL",
        capacity: int = 0,
        max_size: int = 0,
    ) -> JobStore:
        """Open (creating or migrating) the store in `folder`.

        capacity: most unfinished jobs; max_size: most bytes of the database file.
        0 means unlimited for both.
        """
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        if capacity < 0:
            raise ValueError("capacity must be 0 (unlimited) or positive")
        if max_size < 0:
            raise ValueError("max_size must be 0 (unlimited) or positive")
        data = DataFolder.claim(folder)
        connections: list[aiosqlite.Connection] = []
        try:
            writer_db = await _connect(data.database)
            connections.append(writer_db)
            await schema.prepare(writer_db, data.database, synchronous)
            # The commands' rows and outcomes (storage.sql) never go to a temporary file.
            await writer_db.execute("PRAGMA temp_store = MEMORY")
            for statement in (OUTCOME_TABLE, *sql.COMMANDS):
                await writer_db.execute(statement)
            # A killed predecessor may have left wiped credentials in old WAL frames.
            await writer_db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            [(high_water, unfinished, result_bytes)] = await writer_db.execute_fetchall(
                sql.OPEN_COUNTS
            )
            size_limit = await SizeLimit.apply(writer_db, max_size) if max_size else None
            reader_db = await _connect(data.database)
            connections.append(reader_db)
            await reader_db.execute("PRAGMA query_only = ON")
        except BaseException as exc:
            for db in connections:
                await db.close()
            data.release()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open the job store {data.database}: {exc}") from exc
            raise
        return cls(
            data,
            writer_db,
            reader_db,
            next_id=high_water + 1,
            unfinished=unfinished,
            result_bytes=result_bytes,
            capacity=capacity,
            size_limit=size_limit,
        )

    async def close(self) -> None:
        """Commit the writes already queued, stop the writer, close both connections."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writer.stop()
        finally:
            try:
                await self._writer.db.close()
                await self._reader.close()
            finally:
                self._folder.release()

    @property
    def commits(self) -> int:
        """Transactions the writer has committed since open."""
        return self._writer.commits

    @property
    def checkpoints(self) -> int:
        """Checkpoints that cleared the -wal file of wiped data since open (storage.writer)."""
        return self._writer.checkpoints

    @property
    def unfinished(self) -> int:
        """Jobs in state accepted or submitted, forgotten ones included (they still run)."""
        return self._unfinished

    @property
    def result_bytes(self) -> int:
        """Total size of the stored results (response headers and bodies) of done jobs."""
        return self._result_bytes

    async def flush(self) -> None:
        """Wait until every write started so far has committed (or failed): the deletes
        of taken results commit in the background (take_result)."""
        await asyncio.wait([self._writer.enqueue()])

    def set_result_listener(self, listener: Callable[[], None] | None) -> None:
        """Call `listener` right after each commit that stored a result (None: stop)."""
        self._result_listener = listener

    # -- intake ------------------------------------------------------------------------

    async def accept(self, job: NewJob, on_durable: Callable[[int], None] | None = None) -> int:
        """Store a new job; when this returns, it is committed (and fsync'd under FULL).

        `on_durable`: called with the job's id on the writer's thread as soon as the job
        is on disk, before this returns (`Writer.enqueue`); the fast path sends the 202
        from there."""
        job_id, future = self.accept_nowait(job, on_durable)
        await future
        return job_id

    def accept_nowait(
        self, job: NewJob, on_durable: Callable[[int], None] | None = None
    ) -> tuple[int, asyncio.Future[Any]]:
        """`accept`, without waiting: the job's id, and the write's future (done when
        the job is committed; a StoreError if it was not). The refusals (capacity,
        size, ids) are raised here."""
        if self._capacity and self._unfinished + self._queued_accepts >= self._capacity:
            raise CapacityExceeded(
                f"the job store holds {self._capacity} unfinished jobs, its capacity"
            )
        if self._size_limit:
            self._size_limit.check_room(len(job.body), self._writer.used_pages, self._queued_bytes)
        job_id = self._next_id
        if job_id > rows.MAX_ID:
            raise StoreError("the job store has used up all 2**63-1 job ids")
        params = (
            job_id,
            job.mode.value,
            rows.text_param(job.user),
            rows.text_param(job.database),
            rows.text_param(job.method),
            rows.text_param(job.target),
            rows.headers_param(job.headers),
            rows.optional_text_param(job.auth),
            job.body,
            job.created,
        )
        accepted = job.accepted(job_id)
        future = self._writer.enqueue(
            Statement(sql.INSERT_JOB, params, sql.INSERT_JOB_VALUES),
            on_commit=lambda _result: self._accept_committed(accepted),
            on_abort=functools.partial(self._accept_aborted, len(job.body)),
            on_durable=None if on_durable is None else functools.partial(on_durable, job_id),
        )
        # Ids follow arrival order; one burnt by a failed batch was never revealed.
        self._next_id += 1
        self._queued_accepts += 1
        self._queued_bytes += len(job.body)
        return job_id, future

    def _accept_committed(self, job: Job) -> None:
        self._queued_accepts -= 1
        self._queued_bytes -= len(job.body)
        self._unfinished += 1
        self._ready.add((job,))
        self._pending.add(job)

    def _accept_aborted(self, size: int) -> None:
        self._queued_accepts -= 1
        self._queued_bytes -= size

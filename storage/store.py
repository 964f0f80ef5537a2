"""JobStore: the durable job store the proxy talks to, on one SQLite file.

Writes go through the single group-committing writer (``storage.writer``); reads
use a second, read-only connection, which in WAL mode sees every committed write
and never blocks the writer. Every state transition is one statement (or, for a
delete that may either remove or forget a job, two) in one transaction.

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

Retention (``expire_results``, ``evict_results``) removes done jobs only, oldest
finished first, through the partial index on their finish time: a sweep that
finds nothing costs one index probe and no write.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Collection
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from storage import rows, schema, sql
from storage.errors import CapacityExceeded, ResultTooLarge, StoreError
from storage.folder import DataFolder
from storage.limits import SizeLimit
from storage.memory import JOB_OVERHEAD, READ_AHEAD, Fresh, Pending, Ready
from storage.records import Job, JobMode, JobState, Mark, NewJob, Removed, StoredResponse
from storage.rows import valid_id
from storage.writer import OUTCOME_TABLE, OnCommit, Result, Statement, Want, Writer

SYNCHRONOUS = ("FULL", "NORMAL")
BUSY_TIMEOUT_MS = 5000
# Most done jobs one retention statement removes: a few milliseconds of the writer.
RETENTION_CHUNK = 1000
TAKE_RETRY_MIN = 0.05  # seconds before a failed delete of a fetched result is tried again
TAKE_RETRY_MAX = 2.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class Unknown(Enum):
    """What the copies in memory cannot tell (`state_now`, `take_result_now`): the
    file must be read."""

    UNKNOWN = "unknown"


UNKNOWN = Unknown.UNKNOWN


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: the writer issues BEGIN IMMEDIATE/COMMIT itself, and reads
    # run in autocommit so each one sees the newest commit.
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


class JobStore:
    """Open with ``await JobStore.open(folder)``; close with ``await store.close()``."""

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
        self._taken: set[int] = set()  # results handed out, deletes not committed yet
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
            self._size_limit.check_room(len(job.body), self._writer.used_pages)
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
            on_abort=self._accept_aborted,
            on_durable=None if on_durable is None else functools.partial(on_durable, job_id),
        )
        # Ids follow arrival order; one burnt by a failed batch was never revealed.
        self._next_id += 1
        self._queued_accepts += 1
        return job_id, future

    def _accept_committed(self, job: Job) -> None:
        self._queued_accepts -= 1
        self._unfinished += 1
        self._ready.add((job,))
        self._pending.add(job)

    def _accept_aborted(self) -> None:
        self._queued_accepts -= 1

    # -- dispatcher and harvester --------------------------------------------------------

    async def next_accepted(
        self, limit: int, exclude: Collection[int] = (), unsent: Collection[int] = ()
    ) -> list[Job]:
        """Up to `limit` jobs in state accepted, oldest first, skipping the ids in `exclude`
        (the dispatcher's: those it is sending).

        `unsent`: jobs the dispatcher gave back that ArangoDB surely does not have (it
        refused them with 503, or refused the connection). One of those cancelled while
        being sent ends here with the cancel's result. One cancelled so and back without
        that word (the worker process died, the connection broke once the request was
        out) may have run at ArangoDB: it is handed out again, as any such job, and its
        cancel is dropped, as one that came too late."""
        self._unsent.update(unsent)
        found = await self._accepted(limit, exclude)
        jobs, cancelled = self._hand_out(found, exclude)
        for job_id, result in cancelled:
            try:
                await self._cancel_here(job_id, result)
            except StoreError:
                self._cancels.setdefault(job_id, result)  # at the next offer, then
                self._unsent.add(job_id)
        return jobs

    def next_accepted_now(
        self, limit: int, exclude: Collection[int] = (), unsent: Collection[int] = ()
    ) -> list[Job] | Unknown:
        """`next_accepted`, when the copy in memory holds the jobs and none of them has
        a cancel waiting; else UNKNOWN (and nothing changed)."""
        taken = self._ready.take(limit, exclude)
        if len(taken) < limit and not self._ready.complete:
            return UNKNOWN
        if any(job.id in self._cancels for job in taken):
            return UNKNOWN
        self._unsent.update(unsent)
        jobs, _ = self._hand_out(taken, exclude)
        return jobs

    def _hand_out(
        self, found: list[Job], exclude: Collection[int]
    ) -> tuple[list[Job], list[tuple[int, StoredResponse]]]:
        """Of the accepted jobs `found`, those the dispatcher gets, and the cancels to
        carry out here instead (see `next_accepted`)."""
        jobs: list[Job] = []
        cancelled: list[tuple[int, StoredResponse]] = []
        for job in found:
            if job.id in self._withheld:
                continue
            result = self._cancels.pop(job.id, None)
            if result is not None and job.id in self._unsent:
                cancelled.append((job.id, result))
            else:
                jobs.append(job)
            self._unsent.discard(job.id)
        self._sending = (self._sending & set(exclude)) | {job.id for job in jobs}
        return jobs, cancelled

    def queue_time(self) -> float:
        """Seconds the oldest accepted job the store holds in memory has waited (0 if
        none): how long new jobs wait before ArangoDB gets them. After a restart, and
        beyond the copy's budget, the file may hold older ones: then it says less."""
        created = self._ready.oldest_created()
        return 0.0 if created is None else max(0.0, time.time() - created)

    async def cancel_accepted(self, job_id: int, result: StoredResponse) -> bool:
        """Cancel a job in state accepted, as ArangoDB cancels one still queued; False if
        it is not in state accepted (any more).

        Not handed to the dispatcher: done with `result` (410) now. Being sent: ArangoDB
        may have it already, and may run it, so it stays pending; the cancel goes to
        ArangoDB once the job is marked submitted (``Mark.CANCEL``), and ArangoDB's
        result becomes the job's. Given back surely unsent, it is done with `result`
        then; given back otherwise, the cancel is dropped (see `next_accepted`).
        """
        if job_id in self._sending:
            self._cancels[job_id] = result
            return True
        return await self._cancel_here(job_id, result)

    async def _cancel_here(self, job_id: int, result: StoredResponse) -> bool:
        self._withheld.add(job_id)
        try:
            return await self.finish(job_id, result, from_states=(JobState.ACCEPTED,))
        finally:
            self._withheld.discard(job_id)

    async def _accepted(self, limit: int, exclude: Collection[int]) -> list[Job]:
        if limit <= 0:
            return []
        taken = self._ready.take(limit, exclude)
        if len(taken) == limit or self._ready.complete:
            return taken
        limit = min(limit, rows.MAX_ID)
        asked = max(limit, min(READ_AHEAD, self._ready.room))
        self._ready.begin_read()
        try:
            found = await self._read(
                sql.SELECT_ACCEPTED,
                {
                    # one JSON array: the claimed set can be large and varies every call
                    "exclude": f"[{','.join(str(int(i)) for i in exclude)}]",
                    "limit": limit,
                    "ask": asked,
                    "room": self._ready.room_bytes,
                    "overhead": JOB_OVERHEAD,
                },
            )
        except BaseException:
            self._ready.abort_read()
            raise
        jobs = [rows.job_from_row(row[:-1]) for row in found]
        all_of_them = not found or (found[0][-1] < asked and len(found) == found[0][-1])
        return self._ready.end_read(jobs, all_of_them=all_of_them, limit=limit)

    async def submitted(self) -> list[Job]:
        """Every job in state submitted, oldest first (the harvester's start-up list)."""
        found = await self._read(sql.SELECT_SUBMITTED, {})
        return [rows.job_from_row(row) for row in found]

    async def mark_submitted(self, job_id: int, upstream_id: str) -> Mark:
        """accepted -> submitted, recording ArangoDB's job id (see `Mark`)."""
        if not valid_id(job_id):
            return Mark.GONE
        # A cancel already waiting is recorded with the mark; one that comes while
        # the mark commits, right after it.
        recorded = job_id in self._cancels
        params = (job_id, rows.text_param(upstream_id), int(recorded))
        left = await self._command(
            Statement(sql.MARK_SUBMITTED, params, sql.MARK_SUBMITTED_VALUES),
            on_commit=lambda changed: self._submitted(job_id, changed),
        )
        # (recorded: carried out at ArangoDB too, whatever happened to it meanwhile)
        cancel = self._cancels.pop(job_id, None) is not None or recorded
        if not left:
            return Mark.GONE
        if not cancel:
            return Mark.SUBMITTED
        if not recorded:
            try:
                await self.cancel_submitted(job_id, upstream_id)
            except StoreError as exc:
                # The mark is in; failing it now would take the job for gone. The
                # cancel still goes to ArangoDB, only a rerun after a loss is not
                # ruled out.
                log.warning("job %d: cannot record its cancel: %s", job_id, exc)
        return Mark.CANCEL

    def _submitted(self, job_id: int, changed: Result) -> None:
        self._ready.remove(job_id)  # not accepted (any more), whatever the outcome
        self._sending.discard(job_id)
        if changed:
            self._pending.move(job_id, JobState.SUBMITTED)

    async def cancel_submitted(
        self, job_id: int, upstream_id: str, *, cancelled: bool = True
    ) -> bool:
        """Record that the owner of a job at ArangoDB as `upstream_id` cancels it there
        (`cancelled` False: the cancel surely never reached ArangoDB after all); False
        if the job is not there (any more). Its result still comes from ArangoDB, but
        if ArangoDB loses it, it is not sent again (`requeue` refuses it)."""
        if not valid_id(job_id):
            return False
        params = (int(cancelled), job_id, rows.text_param(upstream_id))
        return await self._write_count(Statement(sql.CANCEL_SUBMITTED, params)) == 1

    async def requeue(self, job_id: int, upstream_id: str) -> bool:
        """submitted as `upstream_id` -> accepted (ArangoDB lost it), counting one more
        attempt; False if it is not at ArangoDB as `upstream_id` (any more), or its
        owner cancelled it there (`cancel_submitted`)."""
        if not valid_id(job_id):
            return False
        statement = Statement(sql.REQUEUE, (job_id, rows.text_param(upstream_id)))
        requeued = functools.partial(self._requeued, job_id)
        return await self._write_count(statement, on_commit=requeued) == 1

    def _requeued(self, job_id: int, changed: Result) -> None:
        if changed:
            self._ready.complete = False  # read it back: the dispatcher has no copy
            self._pending.move(job_id, JobState.ACCEPTED)

    async def finish(
        self,
        job_id: int,
        response: StoredResponse,
        *,
        from_states: Collection[JobState] = (JobState.ACCEPTED, JobState.SUBMITTED),
        upstream_id: str | None = None,
    ) -> bool:
        """-> done with `response`, wiping the request; a forgotten job is deleted instead.

        False if the job is not in one of `from_states` (which may not include done),
        or, given `upstream_id`, not at ArangoDB under that id (any more).
        ResultTooLarge if `response` can never fit under the store's size limit.
        """
        return await self.finish_nowait(
            job_id, response, from_states=from_states, upstream_id=upstream_id
        )

    def finish_nowait(
        self,
        job_id: int,
        response: StoredResponse,
        *,
        from_states: Collection[JobState] = (JobState.ACCEPTED, JobState.SUBMITTED),
        upstream_id: str | None = None,
    ) -> asyncio.Future[bool]:
        """`finish`, without waiting: the future of its outcome (cancelling it cancels
        the write, as cancelling `finish` does). ResultTooLarge is raised here."""
        if JobState.DONE in from_states:
            raise ValueError("finish() moves unfinished jobs only; DONE is not a from_state")
        if not valid_id(job_id) or not from_states:
            return _resolved(False)
        states = sorted(JobState(state).value for state in from_states)
        headers = rows.headers_param(response.headers)  # ASCII: characters are bytes
        size = len(headers) + len(response.body)
        reason = self._size_limit and self._size_limit.too_large("a result", size)
        if reason:
            raise ResultTooLarge(reason)
        params = (
            job_id,
            states[0],
            states[-1],
            None if upstream_id is None else rows.text_param(upstream_id),
            time.time(),
            response.status,
            headers,
            response.body,
            size,
        )
        written = self._writer.enqueue(
            Statement(sql.FINISH, params, sql.FINISH_VALUES),
            want=Want.OUTCOME,
            on_commit=lambda result: self._finish_committed(result, job_id, response, size),
            scrubs=True,  # the wiped credentials must leave the -wal file too
        )
        return _mapped(written, lambda changed: len(cast(list[Any], changed)) == 1)

    def _finish_committed(
        self, changed: Result, job_id: int, response: StoredResponse, size: int
    ) -> None:
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

    # -- job facade --------------------------------------------------------------------

    async def state(self, job_id: int, viewer: str | None) -> JobState | None:
        """The state of a visible job, None if there is none."""
        known = self.state_now(job_id, viewer)
        if known is not UNKNOWN:
            return known
        found = await self._read(sql.SELECT_STATE, _by_id(job_id, viewer))
        if not found:
            return None
        state = JobState(found[0][0])
        if state is JobState.DONE:
            # (the read may have seen the finish commit before its callback ran: the
            # copy in memory must not then answer "pending" to a later look)
            self._pending.remove(job_id)
        return state

    def state_now(self, job_id: int, viewer: str | None) -> JobState | Unknown | None:
        """`state`, when the copies in memory can answer without a read; else UNKNOWN."""
        self._check_open()  # (answers from memory too: not once closed)
        if not valid_id(job_id) or job_id in self._taken:
            return None
        fresh = self._fresh.get(job_id)
        if fresh is not None:
            return JobState.DONE if _sees(viewer, fresh.user) else None
        pending = self._pending.get(job_id)
        if pending is not None:
            return pending[1] if _sees(viewer, pending[0]) else None
        return UNKNOWN

    async def get(self, job_id: int, viewer: str | None) -> Job | None:
        """A visible job that is not done yet, else None."""
        if not valid_id(job_id):
            return None
        found = await self._read(sql.SELECT_PENDING_JOB, _by_id(job_id, viewer))
        return rows.job_from_row(found[0]) if found else None

    async def take_result(
        self, job_id: int, viewer: str | None
    ) -> StoredResponse | JobState | None:
        """Done: the result, and the row is gone. Unfinished: its state. Not visible: None.

        The result is handed out at once; its delete commits in the background (the
        client has its answer and need not wait for an fsync). Until then the job is
        in ``_taken``, and readers treat it as gone. Exactly one of two concurrent
        takes gets the result: each checks ``_taken``, reads and claims in one call
        on the reader's thread (`_claim_result`), one after the other, and the id
        leaves ``_taken`` only once its delete has committed, so a later read finds
        no row. A failed delete is retried until it commits; should the process die
        first, the job is back as done: a delivered result can reappear, none is lost.
        """
        known = self.take_result_now(job_id, viewer)
        if known is not UNKNOWN:
            return known
        found = await self._reader_call(_claim_result, self._taken, _by_id(job_id, viewer))
        if isinstance(found, StoredResponse):
            self._handed_out(job_id)
        return found

    def take_result_now(
        self, job_id: int, viewer: str | None
    ) -> StoredResponse | JobState | Unknown | None:
        """`take_result`, when the copies in memory can answer without a read; else
        UNKNOWN."""
        self._check_open()
        if not valid_id(job_id) or job_id in self._taken:
            return None
        fresh = self._fresh.get(job_id)
        if fresh is not None:
            if not _sees(viewer, fresh.user):
                return None
            self._taken.add(job_id)
            self._handed_out(job_id)
            return fresh.response
        pending = self._pending.get(job_id)
        if pending is not None:
            return pending[1] if _sees(viewer, pending[0]) else None
        return UNKNOWN

    def _handed_out(self, job_id: int) -> None:
        """A result was claimed (its id is in ``_taken``): its copy goes, its row too."""
        self._fresh.remove(job_id)
        self._delete_taken(job_id, TAKE_RETRY_MIN)

    def _delete_taken(self, job_id: int, retry: float) -> None:
        """Delete a taken result; a failed delete is tried again (doubling `retry`) until
        it commits or the store closes, and the job stays invisible meanwhile."""

        def deleted(removed: Result) -> None:
            self._taken.discard(job_id)
            self._removed(removed)

        def failed(deleting: asyncio.Future[Result]) -> None:
            if deleting.cancelled() or deleting.exception() is None:
                return
            if retry == TAKE_RETRY_MIN:
                log.warning(
                    "cannot delete fetched job %d yet, will retry: %s", job_id, deleting.exception()
                )
            asyncio.get_running_loop().call_later(
                retry, self._delete_taken, job_id, min(TAKE_RETRY_MAX, retry * 2)
            )

        if self._closed:
            return  # the row stays, as after a crash: the result was handed out already
        deleting = self._writer.enqueue(
            Statement(sql.DELETE_TAKEN, (job_id,), sql.DELETE_TAKEN_VALUES),
            want=Want.OUTCOME,
            on_commit=deleted,
            scrubs=True,
        )
        deleting.add_done_callback(failed)

    async def list_ids(self, *, done: bool, viewer: str | None, limit: int) -> list[int]:
        """Ids of visible jobs, done or pending, ascending, at most `limit`."""
        if limit <= 0:
            return []
        if not done:
            found = await self._read(sql.LIST_PENDING, _listing(viewer, limit))
            return [row[0] for row in found]
        # Results being taken are gone already (take_result). The set as it is before
        # the read: an id that leaves it during the read has had its delete committed,
        # and the read may still have seen the row.
        taken = set(self._taken)
        found = await self._read(sql.LIST_DONE, _listing(viewer, limit + len(taken)))
        return [row[0] for row in found if row[0] not in taken][:limit]

    async def delete(self, job_id: int, viewer: str | None) -> bool:
        """Done: the row is deleted. Unfinished: forgotten (runs on, result dropped)."""
        if not valid_id(job_id):
            return False
        params = _by_id(job_id, viewer)
        deleted = await self._delete(
            Statement(sql.DELETE_DONE_ONE, params), Statement(sql.FORGET_ONE, params)
        )
        return deleted > 0

    async def delete_all(self, viewer: str | None) -> int:
        """delete() for every visible job; returns how many were deleted or forgotten."""
        params = {"viewer": _viewer(viewer)}
        return await self._delete(Statement(sql.DELETE_DONE, params), Statement(sql.FORGET, params))

    async def delete_expired(self, viewer: str | None, stamp: float) -> int:
        """delete() for visible pending jobs created before `stamp` and done jobs finished
        before it (epoch seconds, as ArangoDB's stamps)."""
        # float(): an int stamp beyond 64 bits must not fail the writer's whole batch.
        params = {"viewer": _viewer(viewer), "stamp": float(stamp)}
        return await self._delete(
            Statement(sql.DELETE_DONE_EXPIRED, params), Statement(sql.FORGET_EXPIRED, params)
        )

    # -- retention ---------------------------------------------------------------------

    async def expire_results(self, before: float, *, chunk: int = RETENTION_CHUNK) -> Removed:
        """Delete every done job (any user's) that finished before `before`, in chunks.

        Unfinished jobs are never touched. Costs one index probe when nothing is due.
        """
        removed = Removed(0, 0)
        while True:
            [(oldest,)] = await self._read(sql.OLDEST_FINISHED, {})
            if oldest is None or oldest >= before:
                return removed
            gone = await self._write_rows(
                Statement(sql.EXPIRE, {"stamp": float(before), "limit": chunk}),
                on_commit=self._removed,
                scrubs=True,
            )
            removed += _removed(gone)
            if len(gone) < chunk:
                return removed

    async def evict_results(self, max_bytes: int, *, chunk: int = RETENTION_CHUNK) -> Removed:
        """Delete done jobs, oldest finished first, until results take at most `max_bytes`.

        A result fetched meanwhile counts as removed by its fetch, so when a fetch
        of an old result and an eviction share a batch, the eviction can remove up
        to that result's size more than needed; it never removes too little.
        """
        removed = Removed(0, 0)
        while self._result_bytes > max_bytes:
            excess = self._result_bytes - max_bytes
            gone = await self._write_rows(
                Statement(sql.EVICT, {"excess": excess, "limit": chunk}),
                on_commit=self._removed,
                scrubs=True,
            )
            if not gone:  # pragma: no cover - no done job left, yet a total above the cap
                break  # cannot happen while the total is exact; never loop on it
            removed += _removed(gone)
        return removed

    async def _delete(self, *statements: Statement) -> int:
        """Deletes and forgets in one write; how many jobs were deleted or forgotten."""
        return len(await self._write_rows(*statements, on_commit=self._removed, scrubs=True))

    def _removed(self, result: Result) -> None:
        """on_commit of every write that removes or forgets jobs: (id, state, size) rows."""
        for job_id, state, size in cast(list[Any], result):
            if state == JobState.DONE:
                self._result_bytes -= size
                self._fresh.remove(job_id)
            else:
                self._ready.forget(job_id)
                self._pending.remove(job_id)  # forgotten: no one's to see any more

    # -- plumbing ----------------------------------------------------------------------

    async def _read(self, query: str, params: dict[str, Any]) -> list[Any]:
        return cast(list[Any], await self._reader_call(_fetch_all, query, params))

    async def _reader_call(self, function: Callable[..., T], *args: Any) -> T:
        """`function(connection, *args)` on the reader's thread (aiosqlite has no public
        call for it; see storage.writer)."""
        self._check_open()
        db = self._reader
        try:
            return cast(T, await db._execute(function, db._conn, *args))  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            raise StoreError(f"the job store could not read: {exc}") from exc

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


def _resolved(value: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _mapped(future: asyncio.Future[Any], convert: Callable[[Any], T]) -> asyncio.Future[T]:
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


def _sees(viewer: str | None, owner: str) -> bool:
    """Whether `viewer` (None: the superuser) sees a job of `owner` (as VISIBLE)."""
    return viewer is None or viewer == owner


def _viewer(viewer: str | None) -> str | bytes | None:
    return rows.optional_text_param(viewer)


def _listing(viewer: str | None, limit: int) -> dict[str, Any]:
    return {"viewer": _viewer(viewer), "limit": min(limit, rows.MAX_ID)}


def _fetch_all(conn: sqlite3.Connection, query: str, params: dict[str, Any]) -> list[Any]:
    return conn.execute(query, params).fetchall()


def _claim_result(
    conn: sqlite3.Connection, taken: set[int], params: dict[str, Any]
) -> StoredResponse | JobState | None:
    """take_result's read, on the reader's thread: check, read, claim."""
    if params["id"] in taken:
        return None
    found = conn.execute(sql.SELECT_RESULT, params).fetchone()
    if found is None:
        return None
    state, *result = found
    if state != JobState.DONE:
        return JobState(state)
    taken.add(params["id"])
    return rows.response_from_row(result)


def _by_id(job_id: int, viewer: str | None) -> dict[str, Any]:
    return {"id": job_id, "viewer": _viewer(viewer)}


def _removed(removed: list[Any]) -> Removed:
    return Removed(len(removed), sum(size for _, _, size in removed))

"""The job store's side for the job facade and for retention (part of `JobStore`).

The facade's reads answer from the copies in memory where they can (the
``*_now`` methods, for the fast path, say UNKNOWN where the file must be read).
A result handed out (`take_result`) is gone at once for every later read; its
row's delete commits in the background, with the next commit another write starts
(a lazy write, storage.writer: within LAZY_DELAY at most), and is retried until
it does. Retention (`expire_results`, `evict_results`) removes done jobs only,
oldest finished first, through the partial index on their finish time: a sweep
that finds nothing costs one index probe and no write.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any, cast

from storage import rows, sql
from storage.batch import Result, Statement, Want
from storage.core import UNKNOWN, StoreCore, Unknown, by_id, listing, sees, viewer_param
from storage.records import Answering, Job, JobState, Removed, StoredResponse
from storage.rows import valid_id

# Most done jobs one retention statement removes: a few milliseconds of the writer.
RETENTION_CHUNK = 1000
TAKE_RETRY_MIN = 0.05  # seconds before a failed delete of a fetched result is tried again
TAKE_RETRY_MAX = 2.0

log = logging.getLogger(__name__)


class Facade(StoreCore):
    """The job facade's reads and deletes, and retention."""

    async def state(self, job_id: int, viewer: str | None) -> JobState | None:
        """The state of a visible job, None if there is none."""
        known = self.state_now(job_id, viewer)
        if known is not UNKNOWN:
            return known
        found = await self._read(sql.SELECT_STATE, by_id(job_id, viewer))
        if not found:
            return None
        state = JobState(found[0][0])
        if state is JobState.DONE:
            # (the read may have seen the finish commit before its callback ran: the
            # copy in memory must not then answer "pending" to a later look)
            self._pending.remove(job_id)
        return state

    async def is_accepted(self, job_id: int) -> bool:
        """Whether the job is stored and not sent yet, whatever its mode (a forgotten
        or fire-and-forget job too: invisible to `state`) and owner."""
        return bool(valid_id(job_id) and await self._read(sql.IS_ACCEPTED, {"id": job_id}))

    def state_now(self, job_id: int, viewer: str | None) -> JobState | Unknown | None:
        """`state`, when the copies in memory can answer without a read; else UNKNOWN."""
        self._check_open()  # (answers from memory too: not once closed)
        if not valid_id(job_id) or job_id in self._taken:
            return None
        fresh = self._fresh.get(job_id)
        if fresh is not None:
            return JobState.DONE if sees(viewer, fresh.user) else None
        pending = self._pending.get(job_id)
        if pending is not None:
            return pending[1] if sees(viewer, pending[0]) else None
        return UNKNOWN

    async def get(self, job_id: int, viewer: str | None) -> Job | None:
        """A visible job that is not done yet, else None."""
        if not valid_id(job_id):
            return None
        found = await self._read(sql.SELECT_PENDING_JOB, by_id(job_id, viewer))
        return rows.job_from_row(found[0]) if found else None

    async def take_result(
        self, job_id: int, viewer: str | None, *, hold: bool = False
    ) -> StoredResponse | JobState | None:
        """Done: the result, and the row is gone. Unfinished: its state. Not visible: None.

        The result is handed out at once; its delete commits in the background, with
        the next batch (the client has its answer and need not wait for an fsync, and
        the delete needs no fsync of its own). Until then the job is
        in ``_taken``, and readers treat it as gone. Exactly one of two concurrent
        takes gets the result: each checks ``_taken``, reads and claims in one call
        on the reader's thread (`_claim_result`), one after the other (and no take
        answers from memory while such a read of the job is under way), and the id
        leaves ``_taken`` only once its delete has committed, so a later read finds
        no row. A failed delete is retried until it commits; should the process die
        first, the job is back as done: a delivered result can reappear, none is lost.

        `hold`: a result claimed stays in its row (and its copy in memory), invisible
        as if taken, until the write that stores it elsewhere deletes it with that
        (`finish(taking=...)`) or `give_back`.
        """
        known = self.take_result_now(job_id, viewer, hold=hold)
        if known is not UNKNOWN:
            return known
        # (a finish that commits during the read puts the result in `_fresh`, and the
        # read may see it done and claim it: no take must get it from there meanwhile)
        self._claiming[job_id] += 1
        try:
            found = await self._reader_call(_claim_result, self._taken, by_id(job_id, viewer))
        finally:
            self._claiming[job_id] -= 1
            if not self._claiming[job_id]:
                del self._claiming[job_id]
        if isinstance(found, StoredResponse) and not hold:
            self._handed_out(job_id)
        return found

    def take_result_now(
        self, job_id: int, viewer: str | None, *, hold: bool = False
    ) -> StoredResponse | JobState | Unknown | None:
        """`take_result`, when the copies in memory can answer without a read; else
        UNKNOWN."""
        self._check_open()
        if not valid_id(job_id) or job_id in self._taken:
            return None
        if job_id in self._claiming:
            return UNKNOWN  # (after that read, on the reader's thread: see take_result)
        fresh = self._fresh.get(job_id)
        if fresh is not None:
            if not sees(viewer, fresh.user):
                return None
            self._taken.add(job_id)
            if not hold:
                self._handed_out(job_id)
            return fresh.response
        pending = self._pending.get(job_id)
        if pending is not None:
            return pending[1] if sees(viewer, pending[0]) else None
        return UNKNOWN

    def give_back(self, job_id: int) -> None:
        """End the hold of `take_result(hold=True)` without taking the result: it is back
        for the next take. (Taken, it goes with the write that finishes its taker:
        `finish(taking=...)`.)"""
        self._taken.discard(job_id)

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
            lazy=True,
        )
        deleting.add_done_callback(failed)

    async def list_ids(self, *, done: bool, viewer: str | None, limit: int) -> list[int]:
        """Ids of visible jobs, done or pending, ascending, at most `limit`."""
        if limit <= 0:
            return []
        if not done:
            found = await self._read(sql.LIST_PENDING, listing(viewer, limit))
            return [row[0] for row in found]
        # Results being taken are gone already (take_result). The set as it is before
        # the read: an id that leaves it during the read has had its delete committed,
        # and the read may still have seen the row.
        taken = set(self._taken)
        found = await self._read(sql.LIST_DONE, listing(viewer, limit + len(taken)))
        return [row[0] for row in found if row[0] not in taken][:limit]

    async def delete(
        self, job_id: int, viewer: str | None, answering: Answering | None = None
    ) -> bool:
        """Done: the row is deleted. Unfinished: forgotten (runs on, result dropped).
        `answering`: the job this delete is, finished in the same write."""
        if not valid_id(job_id) or job_id in self._taken:
            # (a result handed out is gone, its row's delete on its way)
            if answering is not None:  # nothing to delete: the job's answer alone,
                missing = answering.missing  # which is `missing` whatever is there
                await self._delete(answering=Answering(answering.job_id, missing, missing))
            return False
        params = by_id(job_id, viewer)
        deleted = await self._delete(
            Statement(sql.DELETE_DONE_ONE, params),
            Statement(sql.FORGET_ONE, params),
            answering=answering,
            seen=params,
        )
        return deleted > 0

    async def delete_all(self, viewer: str | None, answering: Answering | None = None) -> int:
        """delete() for every visible job; returns how many were deleted or forgotten."""
        params = {"viewer": viewer_param(viewer)}
        return await self._delete(
            Statement(sql.DELETE_DONE, params), Statement(sql.FORGET, params), answering=answering
        )

    async def delete_expired(
        self, viewer: str | None, stamp: float, answering: Answering | None = None
    ) -> int:
        """delete() for visible pending jobs created before `stamp` and done jobs finished
        before it (epoch seconds, as ArangoDB's stamps)."""
        # float(): an int stamp beyond 64 bits must not fail the writer's whole batch.
        params = {"viewer": viewer_param(viewer), "stamp": float(stamp)}
        return await self._delete(
            Statement(sql.DELETE_DONE_EXPIRED, params),
            Statement(sql.FORGET_EXPIRED, params),
            answering=answering,
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
            removed += _tally(gone)
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
            removed += _tally(gone)
        return removed

    async def _delete(
        self,
        *statements: Statement,
        answering: Answering | None,
        seen: dict[str, Any] | None = None,
    ) -> int:
        """Deletes and forgets in one write; how many jobs were deleted or forgotten.
        `answering`: the job to finish in that write, with its answer `found` if job
        ``seen["id"]`` is there for ``seen["viewer"]`` (`by_id`) before the deletes,
        else `missing`; always `found` without `seen`."""
        if answering is None:
            return len(await self._write_rows(*statements, on_commit=self._removed, scrubs=True))
        job = answering.job_id
        before = [] if seen is None else [self._answer(job, answering.missing, seen)]
        after = self._answer(job, answering.found, {})
        finishing = [*before, after]

        def committed(each: Result) -> None:
            results = cast(list[list[Any]], each)
            for removed in results[len(before) : -1]:
                self._removed(removed)
            answered = [*results[: len(before)], results[-1]]
            for (_, response, size), changed in zip(finishing, answered, strict=True):
                self._finish_committed(changed, job, response, size, None)

        future = self._writer.enqueue(
            *(statement for statement, _, _ in before),
            *statements,
            after[0],
            want=Want.ROWS_EACH,
            on_commit=committed,
            scrubs=True,
        )
        results = cast(list[list[Any]], await future)
        return sum(len(removed) for removed in results[len(before) : -1])

    def _answer(
        self, job_id: int, response: StoredResponse, seen: dict[str, Any]
    ) -> tuple[Statement, StoredResponse, int]:
        """The statement that finishes job `job_id` with `response` in `_delete`."""
        headers, size = self._result_values(response)
        params = {
            **seen,
            "job": job_id,
            "finished": time.time(),
            "status": response.status,
            "rheaders": headers,
            "rbody": response.body,
            "rsize": size,
        }
        return Statement(sql.ANSWER_UNLESS_SEEN if seen else sql.ANSWER, params), response, size


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


def _tally(removed: list[Any]) -> Removed:
    """What a write that removed jobs removed: (id, state, size) rows."""
    return Removed(len(removed), sum(size for _, _, size in removed))

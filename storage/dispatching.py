"""The job store's side for the dispatcher and the harvester (part of `JobStore`).

They take accepted jobs oldest first (`next_accepted`), record what ArangoDB
did with them (submitted, requeued after a loss, cancelled there) and store
their results (`finish`). Cancels of jobs still accepted meet the dispatcher
here: one being sent waits for its mark or its return (`cancel_accepted`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Collection
from typing import Any, cast

from storage import rows, sql
from storage.batch import Result, Statement, Want
from storage.core import UNKNOWN, StoreCore, Unknown, mapped, resolved
from storage.errors import StoreError
from storage.memory import JOB_OVERHEAD, READ_AHEAD
from storage.records import UNFINISHED, Job, JobState, Mark, StoredResponse
from storage.rows import valid_id

log = logging.getLogger(__name__)

# Most bytes of bodies one read of the file hands out (the first job whatever its
# size): with the default limits 64 jobs of up to 64 MiB would be 4 GiB in one
# answer, several copies of it at once on its way to the worker process.
HAND_OUT_MAX_BYTES = 16 * 1024 * 1024


class Dispatching(StoreCore):
    """Accepted jobs out to the dispatcher, what ArangoDB did with them back in."""

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
        taken = self._from_memory(limit, exclude)
        if taken is None or any(job.id in self._cancels for job in taken):
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

    def _from_memory(self, limit: int, exclude: Collection[int]) -> list[Job] | None:
        """The first `limit` accepted jobs not in `exclude`, if the copy in memory
        holds them all (or holds every accepted job); else None: the file is read."""
        taken = self._ready.take(limit, exclude)
        return taken if len(taken) >= limit or self._ready.complete else None

    async def _accepted(self, limit: int, exclude: Collection[int]) -> list[Job]:
        taken = self._from_memory(limit, exclude)
        if taken is not None:
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
                    "most": HAND_OUT_MAX_BYTES,
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
        """Every job in state submitted, oldest first (the harvester's start-up list),
        each with an empty body: the harvester needs none (a job ArangoDB lost goes
        back to state accepted, and is read anew to be sent again), and 64 jobs of
        64 MiB must not travel to a worker process as one message."""
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
        from_states: Collection[JobState] = UNFINISHED,
        upstream_id: str | None = None,
        taking: int | None = None,
    ) -> bool:
        """-> done with `response`, wiping the request; a forgotten job is deleted instead.

        False if the job is not in one of `from_states` (which may not include done),
        or, given `upstream_id`, not at ArangoDB under that id (any more).
        ResultTooLarge if `response` can never fit under the store's size limit.
        `taking`: a job whose result this one's is, held since `take_result(hold=True)`:
        it is deleted in the same write if this job finishes, else back for the next
        take, and stays held while the write fails (it is tried again).
        """
        return await self.finish_nowait(
            job_id, response, from_states=from_states, upstream_id=upstream_id, taking=taking
        )

    def finish_nowait(
        self,
        job_id: int,
        response: StoredResponse,
        *,
        from_states: Collection[JobState] = UNFINISHED,
        upstream_id: str | None = None,
        taking: int | None = None,
    ) -> asyncio.Future[bool]:
        """`finish`, without waiting: the future of its outcome (cancelling it cancels
        the write, as cancelling `finish` does). ResultTooLarge is raised here."""
        if JobState.DONE in from_states:
            raise ValueError("finish() moves unfinished jobs only; DONE is not a from_state")
        if not valid_id(job_id) or not from_states:
            return resolved(False)
        states = sorted(JobState(state).value for state in from_states)
        headers, size = self._result_values(response)
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
        if taking is None:
            statement = Statement(sql.FINISH, params, sql.FINISH_VALUES)
        else:
            statement = Statement(sql.FINISH_TAKING, (*params, taking), sql.FINISH_TAKING_VALUES)
        written = self._writer.enqueue(
            statement,
            want=Want.OUTCOME,
            on_commit=lambda result: self._finish_committed(result, job_id, response, size, taking),
            scrubs=True,  # the wiped credentials must leave the -wal file too
        )
        return mapped(written, lambda changed: len(cast(list[Any], changed)) == 1)

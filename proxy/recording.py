"""What ArangoDB did, recorded: the proxy's writes once ArangoDB has acted.

Once ArangoDB has accepted a job or handed its result over, the proxy's record
of it must not give up (`record`): giving up would send the job again, or lose
its result. A job just sent is a `Submission` between ArangoDB's 202 and that
record, shared by the dispatcher (which sent it) and the harvester (which looks
at it first). Results the proxy writes itself (ArangoDB lost the job, a result
too large to keep) are 500s in ArangoDB's shape.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from proxy.errors import ERROR_INTERNAL, JSON_TYPE, UpstreamFailure, error_body
from proxy.state import JobQueue
from proxy.tokens import JobCredentials
from proxy.upstream import Reply, Upstream, end_to_end
from storage import Job, JobState, ResultTooLarge, StoredResponse, StoreError
from storage.records import UNFINISHED

log = logging.getLogger(__name__)
T = TypeVar("T")

RECORD_RETRY_MIN = 0.05
RECORD_RETRY_MAX = 1.0

# Not replayed from a stored response: recomputed, or added by the facade.
_NOT_KEPT = ("content-length", "date", "x-arango-async-id")


def stored_response(reply: Reply, *, drop: tuple[str, ...] = ()) -> StoredResponse:
    headers = end_to_end(reply.headers.items(), drop=(*_NOT_KEPT, *drop))
    return StoredResponse(reply.status, tuple(headers.items()), reply.body)


def lost_response(upstream_id: str, why: str) -> StoredResponse:
    return _error_result(
        f"upstream ArangoDB lost this job (its id there was {upstream_id}): it restarted "
        "before the job finished, or the job's result was lost on its way to the proxy; "
        f"it was not run again ({why})"
    )


def refused_response(upstream_id: str, status: int) -> StoredResponse:
    """The result of a job ArangoDB accepted, then refused to hand over: the job's own
    credentials no longer work (a changed password, an expired JWT). ArangoDB's bare
    401 would tell its client the job was refused, when it may well have run."""
    return _error_result(
        f"upstream ArangoDB refused this job's credentials ({status}) when the proxy asked "
        f"for its result (its id there was {upstream_id}): ArangoDB had accepted the job, "
        "which may have run; its result could not be fetched"
    )


def _error_result(message: str) -> StoredResponse:
    """A job's result that the proxy writes itself: 500/4 in ArangoDB's shape."""
    body = error_body(500, ERROR_INTERNAL, message)
    return StoredResponse(500, (("Content-Type", JSON_TYPE),), body)


async def record_result(
    store: JobQueue,
    job_id: int,
    result: StoredResponse,
    *,
    from_states: Collection[JobState] = UNFINISHED,
    upstream_id: str | None = None,
) -> bool:
    """`record` the job's result (given `upstream_id`, only while the job is at
    ArangoDB under that id: `JobQueue.finish`); one that can never fit under
    storage.max_db_size is replaced by an error result that says so (waiting would
    keep the job pending for ever: ArangoDB has handed the result over, and no one
    else has it)."""
    try:
        return await record(
            f"the result of job {job_id}",
            lambda: store.finish(job_id, result, from_states=from_states, upstream_id=upstream_id),
        )
    except ResultTooLarge as exc:
        log.warning("the result of job %d was dropped: %s", job_id, exc)
        why = f"ArangoDB's answer ({result.status}) to this job was dropped: {exc}"
        dropped = _error_result(why)
        return await record(
            f"the result of job {job_id}",
            lambda: store.finish(job_id, dropped, from_states=from_states, upstream_id=upstream_id),
        )


async def record(what: str, write: Callable[[], Awaitable[T]]) -> T:
    """Retry a store write until it commits: what ArangoDB did cannot be undone.

    Used after ArangoDB has acted (accepted a job, handed over a result). Giving
    up would make the job run again, or lose its result; the store's faults
    (full, busy, I/O) pass, and each try is one more chance. Only cancellation
    (shutdown) ends the wait; then the job is resumed from its stored state.

    Each wait is drawn between half and all of the doubling delay: writes that
    failed in one batch (a batch fails as a whole, e.g. results that together
    overshoot storage.max_db_size where each alone fits) must not try again in
    lock-step, each time in one batch again.
    """
    delay = RECORD_RETRY_MIN
    while True:
        try:
            return await write()
        except StoreError as exc:
            level = logging.WARNING if delay == RECORD_RETRY_MIN else logging.DEBUG
            log.log(level, "cannot record %s yet, will retry: %s", what, exc)
        await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - not a secret
        delay = min(RECORD_RETRY_MAX, delay * 2)


async def tell(
    upstream: Upstream, credentials: JobCredentials, job: Job, *calls: tuple[str, str]
) -> None:
    """Best effort, as the job's user: a failure leaves the job to run its course."""
    headers = credentials.headers(job.user, job.auth)
    for method, path in calls:
        try:
            await upstream.call(method, path, headers)
        except UpstreamFailure as failure:
            log.warning("%s %s for job %d failed: %s", method, path, job.id, failure.message)


class Submission:
    """A job just sent, between ArangoDB's 202 and the store's record of it.

    Most jobs are short: the first look (by the task that sent the job, a
    millisecond after the 202: `Harvester.first_look`) finds the result, which is
    then stored straight from state accepted: one write instead of two
    (submitted, then done), and the result does not wait for the other's commit.
    A job still running at its first look is marked submitted; so is one whose
    first look is still under way after harvester.MARK_AFTER (by a task of its
    own: a fetch under way is never given up, since ArangoDB forgets a result it
    has handed over), and a result fetched after the mark began waits for it.
    Until one of the two writes commits, the store says accepted, and a proxy
    killed then sends the job again on its next start (as when it dies between
    the 202 and the mark; README, Guarantees)."""

    __slots__ = ("_timer", "marked", "marker", "marking")

    def __init__(self) -> None:
        self.marking = False  # the mark began: results wait for it
        # the mark's outcome: False if the job was cancelled while being sent
        self.marked: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.marker: asyncio.Task[None] | None = None  # the mark, begun during the look
        self._timer: asyncio.TimerHandle | None = None

    def mark_after(self, seconds: float, mark: Callable[..., None], *args: object) -> None:
        """`mark(*args)` unless the first look has its answer within `seconds`."""
        self._timer = asyncio.get_running_loop().call_later(seconds, mark, *args)

    def answered(self) -> None:
        """The first look has its answer, or is over: no mark meanwhile. (A result
        found must not meet a mark that began while it was being stored: the mark
        would find the job done, or commit first and leave the result no job.)"""
        if self._timer is not None:
            self._timer.cancel()

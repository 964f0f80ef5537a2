"""Dispatcher: hands accepted jobs to ArangoDB in store mode, in arrival order.

At most ``jobs.max_inflight`` jobs are at ArangoDB at once (being sent, or sent
and their results not yet fetched), so the proxy never overflows ArangoDB's
bounded queue. A slot is free again as soon as ArangoDB has handed the result
over, before the proxy's writes about that job (state submitted, the result)
have committed: those wait for the store, not for ArangoDB. What a
submission can meet::

    202 + x-arango-async-id ─▶ its first look, a millisecond later: done at once
                               when it finds the result, otherwise submitted and
                               the harvester takes over (recording.Submission)
    503 (queue full 21003, shutting down 30, maintenance 503),
    connection error, timeout ─▶ stays accepted; back off and retry
    any other reply (401, 404/1228, 400, ...) ─▶ done, that reply is the result

A job for the job API itself is run by the proxy (`execute`: `jobs_api.execute`
over the store), since ArangoDB knows none of the proxy's job ids. Everything
needed to make progress is in the store: after a restart, accepted jobs are
simply picked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine

from multidict import CIMultiDict

from proxy import jobs_api
from proxy.auth import job_at_arangodb
from proxy.cors import CORS_HEADERS
from proxy.errors import UpstreamFailure
from proxy.harvester import MARK_AFTER, Harvester
from proxy.recording import Submission, record, record_result, stored_response, tell
from proxy.state import JobQueue
from proxy.tokens import JobCredentials
from proxy.upstream import Reply, Upstream
from storage import Job, Mark, StoreError

log = logging.getLogger(__name__)

# runs a job for the job API and records its result: (job id, method, target, user)
JobApi = Callable[[int, str, str, str], Awaitable[None]]

RETRYABLE_ERRORS = frozenset({21003, 30, 503})
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
IDLE_RECHECK = 1.0


def is_retryable(reply: Reply) -> bool:
    if reply.status != 503:
        return False
    error_num = reply.error_num()
    # (none: a 503 without ArangoDB's body, some proxy in between: try again)
    return error_num is None or error_num in RETRYABLE_ERRORS


def upstream_headers(job: Job, credentials: JobCredentials) -> CIMultiDict[str]:
    """The job's stored request headers, its credentials, and store mode."""
    headers = CIMultiDict(job.headers)
    headers.extend(credentials.headers(job.user, job.auth))
    headers["x-arango-async"] = "store"
    return headers


class Dispatcher:
    def __init__(
        self,
        store: JobQueue,
        upstream: Upstream,
        credentials: JobCredentials,
        harvester: Harvester,
        *,
        execute: JobApi,
        max_inflight: int,
        metrics: Counter[str],
    ) -> None:
        self._metrics = metrics
        self._execute = execute
        self._store = store
        self._upstream = upstream
        self._credentials = credentials
        self._harvester = harvester
        self._max_inflight = max_inflight
        self._wake = asyncio.Event()
        self._claimed: dict[int, asyncio.Task[None]] = {}  # being sent (still accepted)
        # given back since the last look, surely not at ArangoDB (JobStore.next_accepted)
        self._unsent: set[int] = set()
        self._handed: set[int] = set()  # of those, at ArangoDB: the harvester counts them
        self._backoff = 0.0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self._backoff:
                await asyncio.sleep(self._backoff)
            # Cleared before looking, so a wake() during the look is not lost.
            self._wake.clear()
            sending = len(self._claimed) - len(self._handed)
            free = self._max_inflight - self._harvester.inflight - sending
            jobs = []
            if free > 0:
                unsent, self._unsent = self._unsent, set()
                try:
                    jobs = await self._store.next_accepted(free, self._claimed, unsent)
                except Exception as exc:  # (a bug too: this loop must not end)
                    self._unsent |= unsent
                    if isinstance(exc, StoreError):
                        log.error("cannot read accepted jobs, will retry: %s", exc)  # noqa: TRY400
                    else:
                        log.exception("reading accepted jobs failed, will retry")
                    self._slow_down()
                    continue
            if not jobs:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_RECHECK):
                        await self._wake.wait()
                continue
            for job in jobs:
                self._claimed[job.id] = asyncio.create_task(
                    self._submit(job), name=f"submit-{job.id}"
                )

    async def drain(self, grace: float) -> None:
        """Let submissions under way finish (so nothing is sent twice), then stop them."""
        pending = list(self._claimed.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _submit(self, job: Job) -> None:
        try:
            if jobs_api.is_job_api(job.target):
                await self._execute(job.id, job.method, job.target, job.user)
            else:
                await self._send(job)
        except StoreError as exc:  # (running a job for the job API: tried again)
            log.warning("job %d not run yet, will retry: %s", job.id, exc)
            self._slow_down()
        except Exception:
            # The job stays accepted in the store and is tried again.
            log.exception("submitting job %d failed", job.id)
            self._slow_down()
        finally:
            del self._claimed[job.id]
            self._handed.discard(job.id)
            self._wake.set()

    async def _send(self, job: Job) -> None:
        try:
            reply = await self._upstream.call(
                job.method, job.target, upstream_headers(job, self._credentials), job.body
            )
        except UpstreamFailure as failure:
            log.warning("job %d not submitted, will retry: %s", job.id, failure.message)
            if isinstance(failure.__cause__, ConnectionRefusedError):
                self._unsent.add(job.id)  # (not when the request may have gone out)
            self._slow_down()
            return
        if is_retryable(reply):
            log.info("ArangoDB refused job %d for now (503), will retry", job.id)
            self._unsent.add(job.id)
            self._slow_down()
            return
        self._backoff = 0.0
        upstream_id = reply.headers.get("x-arango-async-id")
        # From here ArangoDB has acted on the job: recording that must not give up,
        # or the job would be sent again.
        if reply.status != 202 or upstream_id is None:
            # (ArangoDB's refusal: with CORS headers for the submitter's Origin, which
            # the job's request carries; the facade adds those of whoever fetches it)
            result = stored_response(reply, drop=CORS_HEADERS)
            await record_result(self._store, job.id, result)
            return
        self._metrics["jobs_submitted_total"] += 1
        submission = Submission()
        tracked = self._harvester.track(job, upstream_id, submission)
        self._handed.add(job.id)
        submission.mark_after(MARK_AFTER, self._mark_meanwhile, job, upstream_id, submission)
        try:
            found = await self._harvester.first_look(tracked)
            # The claim holds until the result's or the mark's write takes the job out
            # of state accepted: the next look must not send it again.
            if submission.marker is not None:
                await submission.marker
            elif not found:
                await self._mark(job, upstream_id, submission)
        finally:
            # (first_look has stopped the mark's timer, however it ended)
            if submission.marker is not None:
                submission.marker.cancel()  # (no-op once done) shutdown
            submission.marked.cancel()  # (no-op once set) shutdown: the harvester must not wait

    def _mark_meanwhile(self, job: Job, upstream_id: str, submission: Submission) -> None:
        """The first look is still under way after MARK_AFTER: mark the job beside it."""
        submission.marker = asyncio.create_task(self._mark(job, upstream_id, submission))

    def _mark(
        self, job: Job, upstream_id: str, submission: Submission
    ) -> Coroutine[None, None, None]:
        """Record the job as submitted; from now on a result fetched waits for that."""
        submission.marking = True
        return self._record_mark(job, upstream_id, submission)

    async def _record_mark(self, job: Job, upstream_id: str, submission: Submission) -> None:
        try:
            mark = await record(
                f"job {job.id} as submitted",
                lambda: self._store.mark_submitted(job.id, upstream_id),
            )
            submission.marked.set_result(mark is not Mark.GONE)
        finally:
            submission.marked.cancel()  # (no-op once set) shutdown
        at_arangodb = job_at_arangodb(job.target, upstream_id)
        if mark is Mark.CANCEL:
            # Its owner cancelled it while we were sending it: ArangoDB's result (410
            # if it had not started) is harvested as any other.
            await tell(self._upstream, self._credentials, job, ("PUT", f"{at_arangodb}/cancel"))
        elif mark is Mark.GONE:
            # Not accepted any more: ArangoDB must not keep this copy. (If another copy
            # is at ArangoDB, sent by a worker process that died, it is watched.)
            self._harvester.forget(upstream_id)
            await tell(
                self._upstream,
                self._credentials,
                job,
                ("PUT", f"{at_arangodb}/cancel"),
                ("DELETE", at_arangodb),
            )
            await record(f"job {job.id}'s other copy", lambda: self._harvester.adopt(job.id))

    def _slow_down(self) -> None:
        self._metrics["submit_retries_total"] += 1
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))

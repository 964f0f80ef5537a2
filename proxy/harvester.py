"""Harvester: notices jobs ArangoDB finished, fetches their results, stores them.

Cheap noticing. Most jobs are short, so a job just submitted is asked for
once, directly, a millisecond later, by the dispatcher's task that sent it (its
first look): done, that one request fetches its result; still running (204),
it joins the others. For the others, one ``GET /_api/job/pending`` per
distinct credential (and database) per tick (ArangoDB lists only the caller's
own jobs), never one request per job: those of ours not on it are fetched
(`_harvest` says why not the done list). The tick follows the age of the youngest
job at ArangoDB, a twentieth of it, between POLL_MIN and POLL_MAX (5 and 10
ms). The target is a median delay of at most 20 ms between ArangoDB finishing
a job and its result at the facade, whatever the job's length: a tick is
never more than 10 ms away, and a long job's result is there 10-12 ms later
than direct at the median, its dispatch included (bench/e2e.py's long jobs;
55 ms when the ticks stretched to 0.5 s, 12-19 ms with 15 ms ticks). Of the
time from ArangoDB's finish to the result at the facade, the wait for the
tick is half a tick at the median; the rest is the list and the fetch, the
result's commit (an fsync, ~1.4 ms) and the hop between the processes. The
price: about 100 small lists a second per credential (and database) while its
jobs run at ArangoDB, none once they are done.

The credentials come from ``proxy.tokens`` (the caller's stored header, or a
token signed for the job's user). A list refused with 401/403 means they no
longer work: each of those jobs is fetched, and ArangoDB's refusal becomes its
result.

Each finished job is fetched with ``PUT /_api/job/{upstream-id}``, which also
frees ArangoDB's memory. A job that ArangoDB lost (it restarted) is not on a
whole pending list either, so it is fetched at the next tick; where the pending
list is cut short, jobs that are on neither list are asked for one by one, once
a second. A 404 to a fetch means ArangoDB lost the job, and
``jobs.lost_job_policy`` decides::

    rerun       ─▶ accepted again (at-least-once)
    rerun-safe  ─▶ GET/HEAD/OPTIONS accepted again, others as "fail"
    fail        ─▶ done, with a 500 whose message says ArangoDB lost the job

A job is re-run MAX_RERUNS times at most, then ended as under "fail": one that
ArangoDB loses every time (its result never gets through whole, and each
fetch that breaks off leaves ArangoDB without it) must not run for ever. A job
its owner cancelled at ArangoDB is never re-run (the store refuses to requeue it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import TypeVar

from proxy.auth import database_prefix, job_at_arangodb
from proxy.errors import (
    ERROR_DATABASE_NOT_FOUND,
    UpstreamFailure,
)
from proxy.recording import (
    Submission,
    lost_response,
    record_result,
    refused_response,
    stored_response,
    tell,
)
from proxy.state import JobQueue
from proxy.tokens import JobCredentials
from proxy.upstream import Reply, Upstream
from storage import Job, JobState, StoredResponse
from storage.records import frozen

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_MIN = 0.005
POLL_MAX = 0.010
TICK_RETRY = 0.5  # seconds before a tick that failed (a bug) is tried again
NEW_JOB_DELAY = 0.001  # a new job's first look
MARK_AFTER = 0.02  # seconds a job just sent waits for its first look before its mark
LOST_CHECK_INTERVAL = 1.0
LIST_SLACK = 1000  # other clients of the same user may have jobs at ArangoDB too
FETCH_CONCURRENCY = 32
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_RERUNS = 5


def _is_final(reply: Reply) -> bool:
    """A result, or ArangoDB no longer accepts the job's credentials: either way
    the job ends (the second with an error result that says why, `refused_response`)."""
    return "x-arango-async-id" in reply.headers or reply.status in (401, 403)


def _database_gone(reply: Reply) -> bool:
    return reply.status == 404 and reply.error_num() == ERROR_DATABASE_NOT_FOUND


class _Refused(Exception):
    """ArangoDB refused the credentials a job list was asked with (401/403), or its
    database is gone (404)."""


# (user, stored Authorization, /_db/{name} or ""): whose credentials, and where
Owner = tuple[str, str | None, str]


@frozen(eq=False)  # each one a key of its own (_fetches)
class Tracked:
    job_id: int
    upstream_id: str
    user: str
    auth: str | None
    method: str
    database: str  # its target's /_db/{name}, or "": where its job API calls go
    reruns: int  # times it was sent again after ArangoDB lost it
    # just sent by the dispatcher; None when read back as submitted
    submission: Submission | None = None

    async def submitted(self) -> bool:
        """Waits for the mark: False if the job was cancelled while being sent (the
        dispatcher abandons it). A mark cancelled by a shutdown may or may not have
        committed: True, and the write that follows checks the state itself."""
        if self.submission is None:
            return True
        marked = self.submission.marked
        if not marked.done():
            await asyncio.wait([marked])  # never cancels the mark, nor raises its cancel
        return marked.cancelled() or marked.result()


class Harvester:
    def __init__(
        self,
        store: JobQueue,
        upstream: Upstream,
        credentials: JobCredentials,
        *,
        policy: str,
        wake_dispatcher: Callable[[], None],
        metrics: Counter[str],
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._upstream = upstream
        self._credentials = credentials
        self._policy = policy
        # called whenever a job leaves ArangoDB: a slot is free, or a job is back in line
        self._wake_dispatcher = wake_dispatcher
        self._jobs: dict[str, Tracked] = {}  # by upstream id
        self._fresh: list[Tracked] = []  # tracked since the last tick: due a first look
        self._new = asyncio.Event()
        self._stopping = asyncio.Event()
        self._youngest = time.monotonic()
        self._last_lost_check = time.monotonic()
        self._fetching = asyncio.Semaphore(FETCH_CONCURRENCY)
        # Each fetch is a task of its own, which no tick waits for: one that ArangoDB
        # is slow to answer (request_timeout at most) holds up no other job's. The
        # task then stores the result it fetched. (A job's first look is the task
        # that sent it, registered here while the look is under way.)
        self._fetches: dict[Tracked, asyncio.Task[None]] = {}
        # other work no tick waits for: jobs whose ArangoDB ids were given out again,
        # being ended; cancels sent again (load)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def inflight(self) -> int:
        """Jobs at ArangoDB: sent, their results not fetched yet."""
        return len(self._jobs)

    def track(self, job: Job, upstream_id: str, submission: Submission | None = None) -> Tracked:
        """Watch a job at ArangoDB. `submission`: it was just sent (not yet recorded),
        and the task that sent it makes its first look (`first_look`); otherwise the
        next tick does."""
        tracked = Tracked(
            job.id,
            upstream_id,
            job.user,
            job.auth,
            job.method,
            database_prefix(job.target),
            job.attempts,
            submission,
        )
        if submission is None or not self._jobs:  # (idle: the lists must start)
            self._new.set()
        if submission is None:
            self._fresh.append(tracked)
        previous = self._jobs.get(upstream_id)
        self._jobs[upstream_id] = tracked
        self._youngest = time.monotonic()
        if previous is not None and previous.job_id != job.id:
            # ArangoDB gave the id out again: it is a new server (restarted on fresh
            # data, or replaced), and the job that had the id is lost there.
            self._in_background(self._lost_once_marked(previous, "whose ArangoDB id was reused"))
        return tracked

    def _in_background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lost_once_marked(self, tracked: Tracked, why: str) -> None:
        """ArangoDB no longer has the job (`why`): lost, once its mark is in. Not
        submitted: cancelled while being sent, the dispatcher deals with it."""
        try:
            if await tracked.submitted():
                await self._lost(tracked)
        except Exception:
            log.exception("ending job %d, %s, failed", tracked.job_id, why)

    async def adopt(self, job_id: int) -> None:
        """Watch `job_id` if the store has it at ArangoDB under an id nobody watches: the
        mark of a worker process that died committed after this one sent the job again
        (its own mark then found the job submitted already)."""
        for job in await self._store.submitted():
            if job.id == job_id and job.upstream_id and job.upstream_id not in self._jobs:
                self.track(job, job.upstream_id)

    async def load(self) -> None:
        """Resume watching every job the store says is at ArangoDB. One its owner
        cancelled is cancelled there once more: the process that recorded the cancel
        may have died before it sent it (a second cancel changes nothing)."""
        for job in await self._store.submitted():
            assert job.upstream_id is not None
            self.track(job, job.upstream_id)
            if job.cancelled:
                at_arangodb = job_at_arangodb(job.target, job.upstream_id)
                self._in_background(
                    tell(self._upstream, self._credentials, job, ("PUT", f"{at_arangodb}/cancel"))
                )

    async def run(self) -> None:
        """Harvest until stop(); a tick under way is finished first, and every result
        fetched is stored."""
        try:
            await self._run()
            while self._fetches or self._background:
                await asyncio.wait({*self._fetches.values(), *self._background})
        finally:
            # Cancelled (the stop's grace is over): the fetches and results still being
            # stored go too; those jobs are still submitted in the store, and asked for
            # again.
            tasks = {*self._fetches.values(), *self._background}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        next_list = 0.0  # when the lists are due (monotonic)
        while not self._stopping.is_set():
            if not self._jobs:
                self._new.clear()
                await self._new.wait()
                continue
            lists = time.monotonic() >= next_list
            try:
                await self.tick(lists=lists)
            except Exception:
                log.exception("harvest tick failed; trying again")
                await self._pause(TICK_RETRY, new_jobs_wake=False)
                continue
            if lists:
                age = time.monotonic() - self._youngest
                next_list = time.monotonic() + min(POLL_MAX, max(POLL_MIN, age / 20))
            await self._pause(next_list - time.monotonic())

    def stop(self) -> None:
        """Let run() return after the tick under way and the fetches it began (results
        fetched get stored)."""
        self._stopping.set()
        self._new.set()

    async def _pause(self, seconds: float, *, new_jobs_wake: bool = True) -> None:
        """Until the next tick, or stop(). A new job cuts the pause short (long-running
        jobs must not make a short one wait POLL_MAX): it is looked at NEW_JOB_DELAY
        later, since it needs a moment to run anyway."""
        self._new.clear()
        if new_jobs_wake and self._fresh:  # tracked during the tick just over
            await asyncio.sleep(NEW_JOB_DELAY)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self._stopping.is_set():
                    await self._new.wait()
                    if new_jobs_wake and not self._stopping.is_set():
                        await asyncio.sleep(NEW_JOB_DELAY)
                        return
                    self._new.clear()

    async def tick(self, *, lists: bool = True) -> None:
        """First looks at new jobs; with `lists`, the lists for the others too.
        (A tick that a new job brings on early looks at that job only: the lists
        keep their own pace, whatever the rate of new jobs.)"""
        fresh, self._fresh = self._fresh, []
        looked_at = {t.upstream_id for t in fresh}
        groups = self._by_credentials(skip=looked_at) if lists else {}
        self._collect_all(fresh)
        unlisted = await asyncio.gather(*(self._harvest(o, jobs) for o, jobs in groups.items()))
        if lists and time.monotonic() - self._last_lost_check >= LOST_CHECK_INTERVAL:
            self._last_lost_check = time.monotonic()
            for missing in unlisted:  # each fetch says for sure: result, 204 or 404
                self._collect_all(missing)

    def _by_credentials(self, skip: Collection[str] = ()) -> dict[Owner, list[Tracked]]:
        # (user, stored header): the same header means the same user; with signed
        # tokens nothing is stored, and each user is one group. Per database: a list
        # is asked where its jobs went (one that fails holds up no other). A job whose
        # fetch is under way is not listed: that fetch answers for it (result, 204 or
        # 404), and a list would cost a request for nothing.
        groups: dict[Owner, list[Tracked]] = defaultdict(list)
        for tracked in self._jobs.values():
            if tracked.upstream_id not in skip and tracked not in self._fetches:
                groups[tracked.user, tracked.auth, tracked.database].append(tracked)
        return groups

    async def _list(self, owner: Owner, which: str, size: int) -> set[str] | None:
        user, auth, database = owner
        try:
            reply = await self._upstream.call(
                "GET",
                f"{database}/_api/job/{which}?count={size + LIST_SLACK}",
                self._credentials.headers(user, auth),
            )
        except UpstreamFailure as failure:
            log.debug("cannot list %s jobs: %s", which, failure.message)
            return None
        if reply.status in (401, 403, 404):  # (404: the database is gone)
            raise _Refused
        if reply.status == 200:
            with contextlib.suppress(ValueError, TypeError):  # not ArangoDB's list of ids
                return {str(uid) for uid in reply.json()}
        log.warning("listing %s jobs at ArangoDB gave %d, no list of ids", which, reply.status)
        return None

    async def _harvest(self, owner: Owner, jobs: list[Tracked]) -> list[Tracked]:
        """Fetch those of `jobs` that ArangoDB has finished. The pending list first:
        whole, it says that each of ours not on it is done (or lost, and its fetch says
        so). The done list would hold every result the same user left unfetched at
        ArangoDB, through the proxy or not, in no set order: cut short at `count`, it
        can leave ours out, and they would wait for the check for lost jobs. The done
        list is asked only when the pending list is cut short (that many of the user's
        jobs pending at ArangoDB) or fails.

        Returns the jobs on neither list (both cut short), which may be lost: the
        check for lost jobs fetches them, once a second. Empty when a whole pending list
        has sent every job of ours not on it, lost ones too, to its fetch already, or
        when a list failed (the check waits for lists that answer)."""
        try:
            pending = await self._list(owner, "pending", len(jobs))
            if pending is not None and len(pending) < len(jobs) + LIST_SLACK:
                self._collect_all(t for t in jobs if t.upstream_id not in pending)
                return []
            # (pending first: a job that finishes in between then shows up as done)
            done = await self._list(owner, "done", len(jobs))
        except _Refused:
            # The credentials no longer work (password changed, token expired, user
            # gone): fetching each job gets ArangoDB's refusal, and the job ends with an
            # error result that says so.
            # (The database is gone: each fetch asks for its job without it.)
            self._collect_all(jobs)
            return []
        if done:
            self._collect_all(t for t in jobs if t.upstream_id in done)
        if pending is None or done is None:
            return []
        return [t for t in jobs if t.upstream_id not in pending | done]

    def _collect_all(self, jobs: Iterable[Tracked]) -> None:
        """Fetch each job (unless a fetch of it is under way), without waiting."""
        for tracked in jobs:
            if tracked not in self._fetches:
                self._as_fetch(tracked, self._fetch(tracked))

    def _as_fetch(self, tracked: Tracked, work: Coroutine[None, None, None]) -> None:
        """Run `work` about the job in a task that counts as its fetch under way."""
        fetch = asyncio.create_task(work)
        self._fetches[tracked] = fetch
        fetch.add_done_callback(functools.partial(self._fetched, tracked))

    def _fetched(self, tracked: Tracked, _: asyncio.Task[None]) -> None:
        del self._fetches[tracked]

    async def _fetch(self, tracked: Tracked) -> None:
        try:
            reply = await self._ask(tracked)
            if reply is None:
                return
            if _is_final(reply):
                await self._take(tracked, reply)
            elif reply.status == 404:  # (a job's own result may be a 404 too: final)
                await self._lost_once_marked(tracked, "which ArangoDB does not know")
        except Exception:
            log.exception("fetching job %d failed; asking again later", tracked.job_id)

    async def first_look(self, tracked: Tracked) -> bool:
        """The first look at a job just sent, made by the task that sent it right
        after `track`: no task, tick or wake-up of its own. True if it found the job's
        result (stored when this returns); False if the job is still at ArangoDB, or
        no answer came: the sender marks it, and the ticks' lists take it from there.
        Until the answer, ticks leave the job alone, as one whose fetch is under way."""
        task = asyncio.current_task()
        assert task is not None
        self._fetches[tracked] = task
        try:
            await asyncio.sleep(NEW_JOB_DELAY)  # it needs a moment to run anyway
            reply = await self._ask(tracked)
        except Exception:
            log.exception("fetching job %d failed; asking again later", tracked.job_id)
            reply = None
        finally:
            del self._fetches[tracked]
            if tracked.submission is not None:
                tracked.submission.answered()
        if reply is None:
            return False
        if _is_final(reply):
            await self._take(tracked, reply)
            return True
        if reply.status == 404:  # (the sender marks it meanwhile)
            self._as_fetch(tracked, self._lost_once_marked(tracked, "which ArangoDB does not know"))
        return False

    async def _ask(self, tracked: Tracked) -> Reply | None:
        """ArangoDB's answer to a fetch of the job; None if none came, or the job is
        not watched under its id any more."""
        async with self._fetching:
            if self._jobs.get(tracked.upstream_id) is not tracked:
                return None  # settled while this fetch waited for its turn
            reply = await self._fetch_result(tracked)
        holder = self._jobs.get(tracked.upstream_id)
        if holder is not None and holder is not tracked:
            # Its id went to another job meanwhile (see track): the answer is that
            # one's, which then finds nothing, and ArangoDB's loss rules apply to it.
            log.warning("job %d: the answer came after its ArangoDB id was reused", tracked.job_id)
            return None
        return reply

    async def _take(self, tracked: Tracked, reply: Reply) -> None:
        """ArangoDB has handed the result over and forgotten the job: its slot is free
        at once (and no fetch must ask for it again: that would be a 404, "lost").
        Then the result is stored, beside the next ticks, which wait for no fetch:
        straight from state accepted if no mark of the job began (Submission)."""
        self._untrack(tracked)
        first = tracked.submission is not None and not tracked.submission.marking
        if "x-arango-async-id" in reply.headers:
            result = stored_response(reply)
        else:  # (401/403: `_is_final`)
            result = refused_response(tracked.upstream_id, reply.status)
        await self._store_result(tracked, result, first=first)

    async def _fetch_result(self, tracked: Tracked) -> Reply | None:
        """ArangoDB's answer to PUT /_api/job/{id}, asked at the job's database; None
        if ArangoDB cannot be reached. Jobs are ArangoDB's per server, not per
        database: once the database is gone (404/1228), the same call without it (at
        _system) still finds the job."""
        headers = self._credentials.headers(tracked.user, tracked.auth)
        path = f"/_api/job/{tracked.upstream_id}"
        try:
            reply = await self._upstream.call("PUT", tracked.database + path, headers)
            if tracked.database and _database_gone(reply):
                reply = await self._upstream.call("PUT", path, headers)
        except UpstreamFailure as failure:
            log.debug("cannot fetch job %d: %s", tracked.job_id, failure.message)
            return None
        return reply

    async def _store_result(self, tracked: Tracked, result: StoredResponse, *, first: bool) -> None:
        """ArangoDB no longer has it: store it or it is gone. `first`: before any mark
        (see Submission), so the job is still accepted in the store."""
        try:
            if first:
                states, upstream_id = (JobState.ACCEPTED,), None  # (none recorded yet)
            elif await tracked.submitted():
                # only the copy this result is of: had ArangoDB lost the job meanwhile,
                # and been sent it again, this one would be another's (a reused id)
                states, upstream_id = (JobState.SUBMITTED,), tracked.upstream_id
            else:
                return  # cancelled while being sent: the dispatcher deals with it
            await record_result(
                self._store, tracked.job_id, result, from_states=states, upstream_id=upstream_id
            )
        except Exception:
            log.exception("storing the result of job %d failed", tracked.job_id)
            return
        self._metrics["jobs_harvested_total"] += 1

    async def _lost(self, tracked: Tracked) -> None:
        rerun = self._policy == "rerun" or (
            self._policy == "rerun-safe" and tracked.method in SAFE_METHODS
        )
        why = f"lost_job_policy={self._policy}"
        if rerun and tracked.reruns >= MAX_RERUNS:
            rerun = False
            why = f"it was lost {tracked.reruns + 1} times, and runs at most that often"
        self._metrics["jobs_lost_total"] += 1
        if rerun and not await self._store.requeue(tracked.job_id, tracked.upstream_id):
            # Refused: its owner cancelled it (or it is not at ArangoDB as this copy
            # any more, and then the finish below changes nothing either).
            rerun = False
            why = "its owner had cancelled it"
        log.warning(
            "ArangoDB lost job %d (upstream %s): %s",
            tracked.job_id,
            tracked.upstream_id,
            "running it again" if rerun else "ending it with an error",
        )
        if not rerun:
            await self._store.finish(
                tracked.job_id,
                lost_response(tracked.upstream_id, why),
                from_states=(JobState.SUBMITTED,),
                upstream_id=tracked.upstream_id,
            )
        self._untrack(tracked)

    def forget(self, upstream_id: str) -> None:
        """Stop watching a job (the dispatcher abandons it)."""
        self._jobs.pop(upstream_id, None)

    def _untrack(self, tracked: Tracked) -> None:
        if self._jobs.get(tracked.upstream_id) is tracked:  # (not a job its id went to)
            del self._jobs[tracked.upstream_id]
        self._wake_dispatcher()

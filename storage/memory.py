"""What the store keeps in memory beside the file, so that a job's hot path reads nothing.

Every job passes the dispatcher once and is fetched once, right after it was
written: reading it back from the file each time costs a hop to the reader's
thread and a row to decode, for bytes the proxy held a moment before. So the
store keeps, next to what it commits:

- ``Ready``: the oldest accepted jobs, in id order, for the dispatcher: every
  accepted job up to an id (``complete``: all of them). The prefix shrinks when
  a job finds no room (a backlog), and to nothing at start-up or after a job
  went back to accepted (requeue). Once the dispatcher has taken the prefix, its
  next look reads the file, a READ_AHEAD's worth at once, so a backlog costs
  one read per few hundred jobs, not one per look.
- ``Fresh``: results stored and not fetched yet, up to a byte budget, for the
  job facade. An id missing here may still be in the file; one here always is.
- ``Pending``: the owner and state of unfinished ``store`` jobs, up to a number
  of jobs, for the job facade: a client polling ``GET``/``PUT /_api/job/{id}``
  until its job is done gets its 204s without a read. Only jobs accepted since
  the store opened; an id missing here may still be pending in the file.

Both change only in the writer's commit callbacks (and in the store's reads),
on the event loop's thread: they follow what is committed, never what is
merely queued. The file stays the truth; losing either costs reads, not jobs.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Collection, Iterable

from storage.records import Job, JobMode, JobState, StoredResponse, frozen

# Small on purpose: the copies serve jobs that pass straight through. A backlog
# (ArangoDB down, results nobody fetches yet) waits in the file, not in memory.
READY_MAX_JOBS = 1024
READY_MAX_BYTES = 4 * 1024 * 1024  # request bodies of the jobs kept, plus JOB_OVERHEAD each
READ_AHEAD = 256  # jobs a read of a backlog brings, room (jobs, bytes) allowing
FRESH_MAX_BYTES = 4 * 1024 * 1024  # results kept for fetching (headers and bodies)
FRESH_MAX_ONE = 64 * 1024  # a larger result is read from the file when fetched
PENDING_MAX_JOBS = 32 * 1024  # about 4 MiB: an id, its owner (shared) and state each


JOB_OVERHEAD = 1024  # bytes counted per job beside its body: headers, strings, the record


def _job_bytes(job: Job) -> int:
    return len(job.body) + JOB_OVERHEAD


_ALL = float("inf")


class Ready:
    """Accepted jobs, oldest first: every accepted job with an id up to ``_through``
    is here, or handed out by a read that had no room for it (``_outside``)."""

    def __init__(self, *, max_jobs: int = READY_MAX_JOBS, max_bytes: int = READY_MAX_BYTES) -> None:
        self._jobs: dict[int, Job] = {}
        self._bytes = 0
        self._max_jobs = max_jobs
        self._max_bytes = max_bytes
        self._through: float = 0  # nothing yet: the file may hold accepted jobs not here
        self._outside: set[int] = set()  # handed out by a read, without room here
        self._reads = 0  # reads of accepted jobs under way
        self._gone: set[int] = set()  # jobs that left state accepted during those reads

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def complete(self) -> bool:
        """Every accepted job is here."""
        return self._through == _ALL

    @complete.setter
    def complete(self, value: bool) -> None:
        self._through = _ALL if value else 0

    @property
    def room(self) -> int:
        """How many more jobs fit (if their bytes do)."""
        return max(0, self._max_jobs - len(self._jobs))

    @property
    def room_bytes(self) -> int:
        """How many more bytes fit, counted as `_job_bytes` does."""
        return max(0, self._max_bytes - self._bytes)

    def add(self, jobs: Iterable[Job]) -> None:
        """Jobs now accepted in the file, kept where they extend the prefix; one without
        room ends it."""
        in_order = True
        for job in jobs:
            if job.id in self._jobs or job.id > self._through:
                continue
            size = _job_bytes(job)
            if len(self._jobs) >= self._max_jobs or self._bytes + size > self._max_bytes:
                self._through = job.id - 1
                continue
            if self._jobs and job.id < next(reversed(self._jobs)):
                in_order = False
            self._jobs[job.id] = job
            self._bytes += size
        if not in_order:
            self._jobs = dict(sorted(self._jobs.items()))

    def begin_read(self) -> None:
        """A read of accepted jobs (oldest first) starts: the list is complete, unless
        a job that comes meanwhile finds no room, or the read finds as many jobs as it
        asked for."""
        self._reads += 1
        self._through = _ALL

    def end_read(self, found: list[Job], *, all_of_them: bool, limit: int) -> list[Job]:
        """The first `limit` jobs a read found (in id order), less those that left
        state accepted since it began (the read saw the file as it was); all of them
        kept here as room allows. Those handed out without room here keep the prefix
        below them until they leave state accepted, so that one the dispatcher gives
        back is found by a later read."""
        fresh = [job for job in found if job.id not in self._gone]
        self._reads -= 1
        if not self._reads:
            self._gone.clear()
        if not all_of_them:
            self._through = min(self._through, found[-1].id if found else 0)
        self.add(fresh)
        handed_out = fresh[:limit]
        self._outside.update(job.id for job in handed_out if job.id not in self._jobs)
        if self._outside:
            self._through = min(self._through, min(self._outside) - 1)
        return handed_out

    def abort_read(self) -> None:
        self.end_read([], all_of_them=False, limit=0)

    def remove(self, job_id: int) -> None:
        """The job left state accepted (submitted, done), or never will be."""
        if self._reads:
            self._gone.add(job_id)
        self._outside.discard(job_id)
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._bytes -= _job_bytes(job)

    def forget(self, job_id: int) -> None:
        """Its owner deleted it: it still runs, its result is dropped."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._jobs[job_id] = dataclasses.replace(job, mode=JobMode.FORGET)

    def oldest_created(self) -> float | None:
        """When the oldest job here was accepted (seconds since the epoch); None if none."""
        for job in self._jobs.values():
            return job.created
        return None

    def take(self, limit: int, exclude: Collection[int]) -> list[Job]:
        """Up to `limit` jobs of the prefix, oldest first, skipping the ids in `exclude`;
        fewer than `limit` and not `complete`: the file may hold more."""
        found: list[Job] = []
        if limit <= 0:
            return found
        for job_id, job in self._jobs.items():
            if job_id > self._through:
                break
            if job_id not in exclude:
                found.append(job)
                if len(found) >= limit:
                    break
        return found


@frozen
class FreshResult:
    user: str
    response: StoredResponse
    size: int


class Fresh:
    """Results stored and not fetched, newest kept when over budget."""

    def __init__(self, *, max_bytes: int = FRESH_MAX_BYTES, max_one: int = FRESH_MAX_ONE) -> None:
        self._results: OrderedDict[int, FreshResult] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_one = max_one

    def __len__(self) -> int:
        return len(self._results)

    def add(self, job_id: int, user: str, response: StoredResponse, size: int) -> None:
        self.remove(job_id)
        if size > self._max_one:
            return
        self._results[job_id] = FreshResult(user, response, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, oldest = self._results.popitem(last=False)
            self._bytes -= oldest.size

    def get(self, job_id: int) -> FreshResult | None:
        return self._results.get(job_id)

    def remove(self, job_id: int) -> None:
        """The result left the file (fetched, deleted, expired), or is being fetched."""
        found = self._results.pop(job_id, None)
        if found is not None:
            self._bytes -= found.size


class Pending:
    """Owner and state of unfinished ``store`` jobs; past ``max_jobs`` new ones are
    left to the file. Every way out of accepted and submitted removes the job here:
    done (finish) and forgotten (a delete while unfinished)."""

    def __init__(self, *, max_jobs: int = PENDING_MAX_JOBS) -> None:
        self._jobs: dict[int, tuple[str, JobState]] = {}
        self._max_jobs = max_jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        """A job now accepted in the file."""
        if job.mode is JobMode.STORE and len(self._jobs) < self._max_jobs:
            self._jobs[job.id] = (job.user, JobState.ACCEPTED)

    def get(self, job_id: int) -> tuple[str, JobState] | None:
        return self._jobs.get(job_id)

    def move(self, job_id: int, state: JobState) -> None:
        """The job went from one unfinished state to the other."""
        found = self._jobs.get(job_id)
        if found is not None:
            self._jobs[job_id] = (found[0], state)

    def remove(self, job_id: int) -> None:
        """The job is done, or forgotten."""
        self._jobs.pop(job_id, None)

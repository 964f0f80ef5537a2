"""Job records and states: the vocabulary shared by the store and the proxy.

State machine (one SQLite transaction per transition)::

    accepted ──▶ submitted ──▶ done ──▶ (fetched or deleted: row gone)
       │             │  └─ upstream lost it ─▶ accepted again, or done with an error result
       └─ cancelled before submit ─▶ done (410, errorNum 21)

A submitted job whose owner cancelled it at ArangoDB carries that (``cancelled``):
if ArangoDB loses it, it is done with the error result, never accepted again.

A job whose owner deleted it before it finished keeps running (as in ArangoDB)
but becomes *forgotten*: its mode turns to ``true`` and its result is dropped
when it finishes, exactly like a fire-and-forget job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum
from operator import attrgetter
from typing import Any, TypeVar, cast, dataclass_transform, overload

Headers = tuple[tuple[str, str], ...]
C = TypeVar("C", bound=type[Any])


@overload
def frozen(cls: C, /) -> C: ...
@overload
def frozen(*, eq: bool = True) -> Callable[[C], C]: ...
@dataclass_transform(frozen_default=True)
def frozen(cls: C | None = None, /, *, eq: bool = True) -> C | Callable[[C], C]:
    """A frozen slots dataclass to the type checker (mypy refuses any assignment to a
    field), a plain one at run time: hashed by its values as a frozen one (`eq`), or
    by identity without `eq`.

    Why: a frozen dataclass sets each field through object.__setattr__, a call per
    field. The records of a job are made several times per job on the event loop's
    thread (the request, the job, its write, its result), and that made a job's record
    of 14 fields cost 5.5 us to make against 0.6 (measured alone)."""

    def make(cls: C) -> C:
        return cast(C, dataclass(slots=True, eq=eq, unsafe_hash=eq)(cls))

    return make if cls is None else make(cls)


class JobState(StrEnum):
    ACCEPTED = "accepted"
    SUBMITTED = "submitted"
    DONE = "done"


UNFINISHED = (JobState.ACCEPTED, JobState.SUBMITTED)  # the states `finish` moves from by default


class Mark(StrEnum):
    """What recording a job as submitted (``JobStore.mark_submitted``) found."""

    SUBMITTED = "submitted"  # recorded
    # recorded; its owner cancelled it while it was being sent: cancel it at ArangoDB,
    # whose result (410 if it had not started, else its own) becomes the job's
    CANCEL = "cancel"
    GONE = "gone"  # not recorded: the job is not in state accepted any more


class JobMode(StrEnum):
    STORE = "store"  # keep the result for the client (x-arango-async: store)
    FORGET = "true"  # fire and forget (x-arango-async: true), or deleted while unfinished


@frozen
class NewJob:
    """A request the intake accepted, before it has an id."""

    mode: JobMode
    user: str
    database: str
    method: str
    target: str  # raw path and query string, exactly as received
    headers: Headers  # headers to forward, without credentials and hop-by-hop ones
    auth: str | None  # the Authorization header, kept only until the job is done
    body: bytes
    created: float  # seconds since the epoch

    def accepted(self, job_id: int) -> Job:
        """The job as stored under `job_id`, in state accepted, before any attempt."""
        return Job(
            job_id,
            self.mode,
            JobState.ACCEPTED,
            self.user,
            self.database,
            self.method,
            self.target,
            self.headers,
            self.auth,
            self.body,
            self.created,
            None,  # upstream_id
            0,  # attempts
        )


@frozen
class Job:
    """A job that still has to run or be harvested (state accepted or submitted)."""

    id: int
    mode: JobMode
    state: JobState
    user: str
    database: str
    method: str
    target: str
    headers: Headers
    auth: str | None
    body: bytes
    created: float
    upstream_id: str | None
    attempts: int
    cancelled: bool = False  # its owner cancelled it at ArangoDB (state submitted)


@frozen
class StoredResponse:
    """The response a job produced (or the error the proxy gave it)."""

    status: int
    headers: Headers
    body: bytes


def _pickled_as_fields(cls: type[Any]) -> None:
    """Pickle instances of the dataclass `cls` as (cls, field values).

    Jobs and responses cross the socket to the worker process by the thousand a
    second; a slots dataclass pickles through Python-level __getstate__ and
    __setstate__ (a dict of fields per object), which took about three times as long.
    """
    values = attrgetter(*(field.name for field in fields(cls)))

    def reduce(self: Any) -> tuple[type[Any], tuple[Any, ...]]:
        return cls, values(self)

    cls.__reduce__ = reduce  # type: ignore[assignment]


_pickled_as_fields(Job)
_pickled_as_fields(StoredResponse)


@frozen
class Removed:
    """What a retention sweep removed: how many stored results, and their bytes."""

    count: int
    bytes: int

    def __add__(self, other: Removed) -> Removed:
        return Removed(self.count + other.count, self.bytes + other.bytes)


@frozen
class Answering:
    """A job for the job API that deletes jobs (``DELETE /_api/job/...`` sent as an async
    job), finished in the same write as its deletes (``JobStore.delete*``): with `found`
    if the job it deletes was there for its viewer (always, for ``all`` and
    ``expired``), else with `missing`. So no crash leaves the deletes done and the job
    to run again (where ``all`` would take jobs accepted since)."""

    job_id: int
    found: StoredResponse
    missing: StoredResponse

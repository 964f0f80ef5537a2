"""ArangoDB's `AsyncJobManager` and the job API on `/_api/job` and `/_admin/job`.

A job entry is created pending when a `store` request is queued, becomes done
when its handler finishes (keeping the handler's whole reply), and is erased
when fetched (`PUT /_api/job/{id}`) or deleted. Entries hold only the user
name, not the database: another user's job is exactly like a missing one, a
superuser sees all (spec §8). Cancel marks the queued or running work and
drops the entry's reference to it, but never removes the entry (spec §3).

    pending --finish--> done --PUT id--> (gone)
       |                  |
       +--DELETE id|all|expired--> (gone; a still-running job's result is dropped)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from tests.standin.call import Call, Identity, double_decimal, uint64
from tests.standin.reply import (
    BAD_PARAMETER,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    Reply,
    empty,
    handler_error,
    json_reply,
)

ASYNC_ID = "x-arango-async-id"
DEFAULT_COUNT = 100


class Status(StrEnum):
    PENDING = "pending"
    DONE = "done"


@dataclass
class Job:
    """One queued request. `job_id` is 0 for fire-and-forget (`x-arango-async: true`)."""

    call: Call
    job_id: int
    canceled: bool = False
    queued_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.canceled = True
        self.call.killed.set()


@dataclass
class Entry:
    user: str
    stamp: float  # creation time while pending, completion time when done
    job: Job | None
    reply: Reply | None = None

    @property
    def status(self) -> Status:
        return Status.PENDING if self.reply is None else Status.DONE


class JobManager:
    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}

    def register(self, job: Job) -> None:
        self.entries[job.job_id] = Entry(job.call.identity.user, time.time(), job)

    def finish(self, job_id: int, reply: Reply) -> None:
        entry = self.entries.get(job_id)
        if entry is None:
            return  # deleted while it ran: the result is dropped
        entry.reply, entry.stamp, entry.job = reply, time.time(), None

    def visible(self, job_id: int, who: Identity) -> Entry | None:
        entry = self.entries.get(job_id)
        return entry if entry is not None and who.may_see(entry.user) else None

    def ids(self, status: Status, count: int, who: Identity) -> list[int]:
        found: list[int] = []
        for job_id in sorted(self.entries):
            entry = self.entries[job_id]
            if entry.status is status and who.may_see(entry.user):
                found.append(job_id)
                # ArangoDB's loop appends before it compares: count=0 still gives one
                if len(found) >= count:
                    break
        return found

    def delete(self, job_id: int, who: Identity) -> bool:
        if self.visible(job_id, who) is None:
            return False
        del self.entries[job_id]
        return True

    def delete_where(self, who: Identity, before: float | None = None) -> None:
        for job_id, entry in list(self.entries.items()):
            if who.may_see(entry.user) and (before is None or entry.stamp < before):
                del self.entries[job_id]

    def cancel(self, job_id: int, who: Identity) -> bool:
        entry = self.visible(job_id, who)
        if entry is None:
            return False
        if entry.job is not None:
            entry.job.cancel()
            entry.job = None
        return True


def _result_true() -> Reply:
    return json_reply(200, {"result": True})


def job_api(call: Call, jobs: JobManager) -> Reply:
    """`RestJobHandler::execute`, suffix by suffix (spec §2-§6)."""
    suffixes, who = call.suffixes, call.identity
    if call.method == "GET":
        if len(suffixes) != 1:
            return BAD_PARAMETER
        value = suffixes[0]
        if value and "1" <= value[0] <= "9":
            entry = jobs.visible(uint64(value), who)
            if entry is None:
                return NOT_FOUND
            return empty(204 if entry.status is Status.PENDING else 200)
        if value not in ("done", "pending"):
            return BAD_PARAMETER
        text = call.param("count")
        count = DEFAULT_COUNT if text is None else uint64(text)
        ids = jobs.ids(Status(value), count, who)
        return json_reply(200, [str(job_id) for job_id in ids])
    if call.method == "PUT":
        if len(suffixes) == 1:
            return _fetch(suffixes[0], jobs, who)
        if len(suffixes) == 2:
            if suffixes[1] != "cancel":
                return BAD_PARAMETER
            job_id = uint64(suffixes[0])
            if not jobs.cancel(job_id, who):
                return handler_error(
                    404,
                    404,
                    f"could not find job ({job_id}) in AsyncJobManager during cancel operation",
                )
            return _result_true()
        return BAD_PARAMETER
    if call.method == "DELETE":
        if len(suffixes) != 1:
            return BAD_PARAMETER
        value = suffixes[0]
        if value == "all":
            jobs.delete_where(who)
        elif value == "expired":
            stamp = call.param("stamp")
            if stamp is None:
                return BAD_PARAMETER
            jobs.delete_where(who, before=double_decimal(stamp))
        elif not jobs.delete(uint64(value), who):
            return NOT_FOUND
        return _result_true()
    return METHOD_NOT_ALLOWED


def _fetch(value: str, jobs: JobManager, who: Identity) -> Reply:
    job_id = uint64(value)
    entry = jobs.visible(job_id, who)
    if entry is None:
        return NOT_FOUND
    if entry.reply is None:
        return empty(204)
    del jobs.entries[job_id]
    stored = entry.reply
    # setHeaderNC replaces: a stored reply that had an id itself gets this one
    headers = tuple((k, v) for k, v in stored.headers if k.lower() != ASYNC_ID)
    return Reply(stored.status, stored.body, stored.content_type, (*headers, (ASYNC_ID, value)))

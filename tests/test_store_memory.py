"""The store's in-memory copies (storage.memory) against the file they mirror.

The dispatcher's list of accepted jobs and the fetchable results kept in memory
must always say what a read of the file says. Random rounds of concurrent
operations (so writes share batches, and reads run while batches commit), then
after each round: ``next_accepted`` equals the accepted rows of the file,
``state`` of every job, for each viewer, equals its row, and no result is
handed out twice.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from storage import Job, JobMode, JobState, JobStore, Mark, StoredResponse, StoreError, dispatching
from storage.memory import JOB_OVERHEAD, READ_AHEAD, READY_MAX_BYTES, Fresh, Pending, Ready
from storage.store import UNKNOWN, Unknown
from tests.test_store import CANCELED, RESULT, new_job, raw_rows

MIB = 1024 * 1024

USERS = ("alice", "bob")


def accepted_rows(data: Path) -> list[tuple[int, str]]:
    return raw_rows(data, "SELECT id, mode FROM jobs WHERE state = 'accepted' ORDER BY id")


async def check_against_file(store: JobStore, data: Path, ids: list[int]) -> None:
    listed = [(job.id, job.mode.value) for job in await store.next_accepted(10**6)]
    assert listed == accepted_rows(data)
    query = "SELECT id, user, CASE mode WHEN 'store' THEN state END FROM jobs"
    rows = {job_id: (user, state) for job_id, user, state in raw_rows(data, query)}
    for job_id in ids:
        owner, state = rows.get(job_id, (None, None))
        expected = None if state is None else JobState(state)
        assert await store.state(job_id, None) == expected
        for viewer in USERS:
            assert await store.state(job_id, viewer) == (expected if viewer == owner else None)


class Model:
    """Drives the store at random, records what every fetch handed out."""

    def __init__(self, store: JobStore, rng: random.Random, ways: random.Random) -> None:
        self.store = store
        self.rng = rng
        self.ways = ways  # the worker process's way or not (apart: rng's draws stay as they were)
        self.ids: list[int] = []
        self.submitted: list[int] = []  # marked submitted once (may have moved on since)
        self.finished: list[int] = []  # done once
        self.delivered: list[int] = []

    def pick(self, likely: list[int] | None = None) -> int:
        """Mostly an id from `likely`, else any id the store gave."""
        if likely and self.rng.random() < 0.8:
            return self.rng.choice(likely[-20:])
        return self.rng.choice(self.ids) if self.ids else 1

    async def accept(self) -> None:
        mode = self.rng.choice([JobMode.STORE, JobMode.STORE, JobMode.FORGET])
        user = self.rng.choice(USERS)
        self.ids.append(await self.store.accept(new_job(mode=mode, user=user)))

    async def dispatch(self) -> None:
        limit = self.rng.randint(1, 4)
        # as the worker process looks: from memory when it can
        now = self.store.next_accepted_now(limit) if self.ways.random() < 0.5 else UNKNOWN
        jobs = await self.store.next_accepted(limit) if isinstance(now, Unknown) else now
        for job in jobs:
            if self.rng.random() < 0.8:
                if await self.store.mark_submitted(job.id, f"u{job.id}") is not Mark.GONE:
                    self.submitted.append(job.id)
            elif await self.finish(job.id, RESULT, (JobState.ACCEPTED,)):
                self.finished.append(job.id)  # an immediate reply from ArangoDB

    async def harvest(self) -> None:
        job_id = self.pick(self.submitted)
        if await self.finish(job_id, _result(self.rng), (JobState.SUBMITTED,)):
            self.finished.append(job_id)

    async def finish(
        self, job_id: int, result: StoredResponse, from_states: tuple[JobState, ...]
    ) -> bool:
        """finish, or as the worker process's results are stored (finish_nowait)."""
        if self.ways.random() < 0.5:
            return await self.store.finish_nowait(job_id, result, from_states=from_states)
        return await self.store.finish(job_id, result, from_states=from_states)

    async def cancel(self) -> None:
        await self.store.finish(self.pick(), RESULT, from_states=(JobState.ACCEPTED,))

    async def requeue(self) -> None:
        job_id = self.pick(self.submitted)
        await self.store.requeue(job_id, f"u{job_id}")

    async def fetch(self) -> None:
        job_id = self.pick(self.finished)
        found = await self.store.take_result(job_id, self.rng.choice([None, *USERS]))
        if isinstance(found, StoredResponse):
            self.delivered.append(job_id)

    async def delete(self) -> None:
        await self.store.delete(self.pick(self.finished), self.rng.choice([None, *USERS]))

    async def delete_all(self) -> None:
        await self.store.delete_all(self.rng.choice(USERS))

    async def retention(self) -> None:
        if self.rng.random() < 0.5:
            await self.store.evict_results(max(0, self.store.result_bytes - 200))
        else:
            await self.store.expire_results(time.time() - 0.05, chunk=3)

    def operations(self) -> list[Callable[[], Awaitable[None]]]:
        weighted: list[tuple[Callable[[], Awaitable[None]], float]] = [
            (self.accept, 60),
            (self.dispatch, 30),
            (self.harvest, 40),
            (self.cancel, 10),
            (self.requeue, 10),
            (self.fetch, 40),
            (self.delete, 10),
            (self.delete_all, 1),
            (self.retention, 1),
        ]
        calls, weights = zip(*weighted, strict=True)
        return list(self.rng.choices(calls, weights, k=self.rng.randint(1, 12)))


def _result(rng: random.Random) -> StoredResponse:
    return StoredResponse(200, (("Content-Type", "text/plain"),), rng.randbytes(rng.randint(0, 90)))


@pytest.mark.parametrize("seed", range(6))
async def test_memory_follows_the_file_under_concurrent_operations(
    store: JobStore, data: Path, seed: int
) -> None:
    model = Model(store, random.Random(seed), random.Random(-1 - seed))
    for _ in range(60):
        await asyncio.gather(*(operation() for operation in model.operations()))
        await store.flush()  # fetched results' deletes commit in the background
        await check_against_file(store, data, model.ids)
    assert len(model.delivered) == len(set(model.delivered))
    assert len(model.delivered) > 10  # the rounds did fetch results


async def test_a_fetch_served_from_memory_reads_nothing(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await store.accept(new_job())
    [job] = await store.next_accepted(1)
    assert await store.mark_submitted(job.id, "u1") is Mark.SUBMITTED
    assert await store.finish(job_id, RESULT)

    async def no_reads(*_: Any) -> Any:
        raise AssertionError("read the file")

    monkeypatch.setattr(store, "_reader_call", no_reads)
    assert await store.next_accepted(10) == []
    assert await store.state(job_id, "bob") is None  # not Bob's
    assert await store.take_result(job_id, "bob") is None
    assert await store.state(job_id, "alice") is JobState.DONE
    assert await store.take_result(job_id, "alice") == RESULT
    assert await store.state(job_id, "alice") is None
    assert await store.take_result(job_id, "alice") is None


def count_reads(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The store's reads from now on (each call's arguments), as they happen."""
    reads: list[Any] = []
    read = store._reader_call

    async def counted(*args: Any) -> Any:
        reads.append(args)
        return await read(*args)

    monkeypatch.setattr(store, "_reader_call", counted)
    return reads


async def test_polling_an_unfinished_job_reads_nothing(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = count_reads(store, monkeypatch)
    mine = await store.accept(new_job(user="alice"))
    theirs = await store.accept(new_job(user="bob"))
    forgotten = await store.accept(new_job(user="alice"))
    seen_by = {None: JobState.ACCEPTED, "alice": JobState.ACCEPTED, "bob": None}
    for viewer, expected in seen_by.items():
        assert await store.state(mine, viewer) is expected
        assert await store.take_result(mine, viewer) is expected
    assert await store.mark_submitted(mine, "u1") is Mark.SUBMITTED
    assert await store.state(mine, "alice") is JobState.SUBMITTED
    assert await store.take_result(theirs, "alice") is None
    assert await store.requeue(mine, "u1")
    assert await store.take_result(mine, "alice") is JobState.ACCEPTED
    assert reads == []
    assert await store.delete(forgotten, "alice")  # forgotten: runs on, no one's any more
    assert await store.state(forgotten, None) is None  # (read: the copy no longer has it)
    reads.clear()
    assert await store.finish(mine, RESULT)
    assert await store.state(mine, "alice") is JobState.DONE
    assert await store.take_result(mine, "alice") == RESULT
    assert reads == []
    assert await store.state(mine, "alice") is None  # fetched: gone


async def test_unfinished_jobs_past_the_budget_or_from_before_a_restart_are_read(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await JobStore.open(data)
    before = await store.accept(new_job())
    await store.close()
    monkeypatch.setattr("storage.core.Pending", functools.partial(Pending, max_jobs=1))
    store = await JobStore.open(data)
    try:
        kept, past = await store.accept(new_job()), await store.accept(new_job())
        reads = count_reads(store, monkeypatch)
        assert [await store.state(i, "alice") for i in (before, kept, past)] == [
            JobState.ACCEPTED
        ] * 3
        assert len(reads) == 2  # the one kept in memory needed none
        assert await store.finish(past, RESULT)
        assert await store.state(past, "alice") is JobState.DONE
    finally:
        await store.close()


async def test_the_memory_only_answers_say_unknown_where_a_read_is_needed(data: Path) -> None:
    """state_now and take_result_now (the fast path's, without awaiting) answer what
    the copies in memory hold, as state and take_result; of a job from before a
    restart they say UNKNOWN and claim nothing, so the read can still hand it out."""
    store = await JobStore.open(data)
    before = await store.accept(new_job())
    assert await store.finish(before, RESULT)
    await store.close()
    store = await JobStore.open(data)
    try:
        assert store.state_now(before, "alice") is UNKNOWN
        assert store.take_result_now(before, "alice") is UNKNOWN
        assert await store.take_result(before, "alice") == RESULT
        assert store.state_now(before, "alice") is None  # taken: gone
        job_id = await store.accept(new_job())
        assert store.state_now(job_id, "bob") is None
        assert store.take_result_now(job_id, "alice") is JobState.ACCEPTED
        assert await store.finish(job_id, RESULT)
        assert store.state_now(job_id, None) is JobState.DONE
        assert store.take_result_now(job_id, "bob") is None
        assert store.take_result_now(job_id, "alice") == RESULT
        assert store.take_result_now(job_id, "alice") is None  # handed out once
        assert store.state_now(0, None) is None
    finally:
        await store.close()
    with pytest.raises(StoreError):
        store.state_now(job_id, None)


async def test_the_dispatchers_look_from_memory_hands_out_the_same_or_says_unknown(
    data: Path,
) -> None:
    """next_accepted_now (the worker process's looks, answered without a task) hands
    out what next_accepted would; where that takes a read (jobs from before a restart)
    or a cancel to write, it says UNKNOWN and changes nothing."""
    store = await JobStore.open(data)
    left = await store.accept(new_job())
    await store.close()
    store = await JobStore.open(data)
    try:
        assert store.next_accepted_now(1) is UNKNOWN  # the file holds one the copy lacks
        assert [job.id for job in await store.next_accepted(1)] == [left]
        first, second = await store.accept(new_job()), await store.accept(new_job())
        now = store.next_accepted_now(5, (left,))  # the read found all: the copy answers
        assert not isinstance(now, Unknown)
        assert [job.id for job in now] == [first, second]
        assert [job.id for job in await store.next_accepted(5, (left,))] == [first, second]
        # `first` is being sent: its cancel waits; given back unsent, it is cancelled here
        assert await store.cancel_accepted(first, CANCELED)
        assert store.next_accepted_now(5, (left,), (first,)) is UNKNOWN
        assert [job.id for job in await store.next_accepted(5, (left,), (first,))] == [second]
        assert await store.take_result(first, None) == CANCELED
        assert store.next_accepted_now(0) == []
    finally:
        await store.close()


def test_pending_keeps_store_jobs_within_its_budget() -> None:
    pending = Pending(max_jobs=2)
    jobs = [new_job(mode=mode).accepted(i) for i, mode in enumerate(JobMode, start=1)]
    for job in jobs:
        pending.add(job)
    assert [pending.get(job.id) for job in jobs] == [("alice", JobState.ACCEPTED), None]
    pending.add(new_job().accepted(3))
    pending.add(new_job().accepted(4))  # past the budget: left to the file
    assert (len(pending), pending.get(4)) == (2, None)
    pending.move(3, JobState.SUBMITTED)
    pending.move(4, JobState.SUBMITTED)  # not here: stays so
    assert (pending.get(3), pending.get(4)) == (("alice", JobState.SUBMITTED), None)
    pending.remove(1)
    pending.add(new_job().accepted(4))
    assert pending.get(4) == ("alice", JobState.ACCEPTED)


async def test_jobs_left_from_before_a_restart_are_read_from_the_file(data: Path) -> None:
    store = await JobStore.open(data)
    ids = [await store.accept(new_job()) for _ in range(5)]
    await store.close()
    store = await JobStore.open(data)
    try:
        assert [job.id for job in await store.next_accepted(2)] == ids[:2]
        later = await store.accept(new_job())
        assert [job.id for job in await store.next_accepted(10)] == [*ids, later]
        assert await store.requeue(ids[0], "u") is False  # not submitted: nothing to requeue
        assert await store.mark_submitted(ids[0], "u") is Mark.SUBMITTED
        assert await store.requeue(ids[0], "u")
        # read back from the file, in id order, with the attempt counted
        [again, *_] = await store.next_accepted(10)
        assert (again.id, again.attempts) == (ids[0], 1)
    finally:
        await store.close()


async def test_a_job_that_leaves_accepted_during_a_read_is_not_handed_out(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await JobStore.open(data)
    [first, second] = [await store.accept(new_job()) for _ in range(2)]
    await store.close()
    store = await JobStore.open(data)  # jobs left over: the next look reads the file
    try:
        read = store._read
        has_read = asyncio.Event()
        go_on = asyncio.Event()

        async def slow_read(*args: Any) -> list[Any]:
            found = await read(*args)
            has_read.set()
            await go_on.wait()  # the rows are read; the cancel commits before they arrive
            return found

        monkeypatch.setattr(store, "_read", slow_read)
        reading = asyncio.ensure_future(store.next_accepted(10))
        await has_read.wait()
        assert await store.finish(first, RESULT, from_states=(JobState.ACCEPTED,))  # cancelled
        go_on.set()
        assert [job.id for job in await reading] == [second]
        assert [job.id for job in await store.next_accepted(10)] == [second]
    finally:
        await store.close()


def test_ready_keeps_id_order_and_its_limits() -> None:
    jobs = {i: _job(i, body=b"x" * 10) for i in range(1, 8)}
    ready = Ready(max_jobs=4, max_bytes=10**6)
    ready.complete = True
    ready.add([jobs[5], jobs[6], jobs[2]])
    assert [job.id for job in ready.take(10, ())] == [2, 5, 6]
    assert ready.complete
    ready.forget(5)
    ready.forget(99)
    modes = [job.mode for job in ready.take(10, ())]
    assert modes == [JobMode.STORE, JobMode.FORGET, JobMode.STORE]
    ready.add([jobs[3], jobs[4]])  # one too many: the prefix ends below it
    assert not ready.complete
    assert len(ready) == 4
    assert [job.id for job in ready.take(10, ())] == [2, 3]  # 4 is missing: 5 and 6 wait
    assert [job.id for job in ready.take(2, {2})] == [3]
    assert ready.take(0, ()) == []
    ready.remove(2)
    ready.add([jobs[7]])  # past the prefix: not kept, though there is room now
    assert len(ready) == 3
    small = Ready(max_jobs=100, max_bytes=2 * (10 + JOB_OVERHEAD) + 5)
    small.complete = True
    small.add([jobs[1], jobs[2], jobs[3]])  # room for two
    assert [job.id for job in small.take(10, ())] == [1, 2]
    assert not small.complete


def test_a_read_of_a_backlog_reads_ahead_and_ends_the_prefix_where_it_stopped() -> None:
    jobs = [_job(i) for i in range(1, 11)]
    ready = Ready(max_jobs=100, max_bytes=10**6)
    ready.begin_read()
    assert [job.id for job in ready.end_read(jobs[:4], all_of_them=False, limit=2)] == [1, 2]
    assert not ready.complete  # the file may hold more after 4
    assert [job.id for job in ready.take(10, {1, 2})] == [3, 4]
    ready.add([jobs[9]])  # accepted meanwhile: beyond the prefix
    assert [job.id for job in ready.take(10, ())] == [1, 2, 3, 4]
    ready.begin_read()
    assert [job.id for job in ready.end_read(jobs[4:], all_of_them=True, limit=10)] == list(
        range(5, 11)
    )
    assert ready.complete
    assert [job.id for job in ready.take(10, ())] == list(range(1, 11))


def test_a_job_handed_out_without_room_is_found_again_when_given_back() -> None:
    """A read hands out jobs that do not fit here; while the dispatcher holds one (it is
    excluded from reads), the list must not call itself complete, or the job, given back
    after a failed send, would never be handed out again."""
    big = [_job(i, body=b"x" * 3000) for i in range(1, 4)]
    ready = Ready(max_jobs=100, max_bytes=2 * (3000 + JOB_OVERHEAD) + 5)  # room for two
    ready.begin_read()
    assert [job.id for job in ready.end_read(big, all_of_them=True, limit=3)] == [1, 2, 3]
    assert len(ready) == 2
    ready.remove(1)  # sent
    ready.begin_read()  # job 3 is held by the dispatcher: the read does not see it
    assert ready.end_read([big[1]], all_of_them=True, limit=10) == [big[1]]
    assert not ready.complete
    assert [job.id for job in ready.take(10, {3})] == [2]  # and the store reads the file
    ready.remove(3)  # it left accepted: nothing is outside any more
    ready.begin_read()
    ready.end_read([big[1]], all_of_them=True, limit=10)
    assert ready.complete


async def test_a_backlog_is_read_a_read_ahead_at_a_time(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await JobStore.open(data)
    ids = [await store.accept(new_job()) for _ in range(READ_AHEAD + 10)]
    await store.close()
    store = await JobStore.open(data)
    reads = 0
    read = store._read

    async def counted(*args: Any) -> list[Any]:
        nonlocal reads
        reads += 1
        return await read(*args)

    try:
        monkeypatch.setattr(store, "_read", counted)
        handed_out = []
        for _ in range(len(ids)):
            [job] = await store.next_accepted(1, ())
            handed_out.append(job.id)
            assert await store.mark_submitted(job.id, str(job.id)) is Mark.SUBMITTED
        assert handed_out == ids
        assert reads == 2
        assert await store.next_accepted(1, ()) == []
        assert reads == 2  # the second read found them all: the list is complete
    finally:
        await store.close()


async def test_a_read_ahead_stops_at_the_byte_budget(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large bodies: a read brings what the dispatcher asked for, and of the rest only
    what fits in the copy's bytes (not READ_AHEAD bodies of any size)."""
    store = await JobStore.open(data)
    body = b"x" * (READY_MAX_BYTES // 10)
    ids = [await store.accept(new_job(body=body)) for _ in range(30)]
    await store.close()
    store = await JobStore.open(data)
    rows_read: list[int] = []
    read = store._read

    async def counted(*args: Any) -> list[Any]:
        found = await read(*args)
        rows_read.append(len(found))
        return found

    monkeypatch.setattr(store, "_read", counted)
    try:
        assert [job.id for job in await store.next_accepted(2, ())] == ids[:2]
        assert rows_read == [9]  # nine fit in the budget with their overhead; ten do not
        handed_out = [job.id for job in await store.next_accepted(30, ids[:2])]
        assert handed_out == ids[2:]  # more than fit: what was asked for, all the same
        assert rows_read == [9, 28]
    finally:
        await store.close()


def test_fresh_keeps_the_newest_within_its_budget() -> None:
    fresh = Fresh(max_bytes=100, max_one=60)
    response = StoredResponse(200, (), b"")
    fresh.add(1, "alice", response, 40)
    fresh.add(2, "alice", response, 40)
    fresh.add(3, "alice", response, 61)  # too large to keep
    assert fresh.get(3) is None
    fresh.add(4, "bob", response, 40)  # over budget: the oldest goes
    assert [fresh.get(i) is not None for i in (1, 2, 4)] == [False, True, True]
    fresh.add(2, "alice", response, 40)  # again: counted once
    fresh.remove(4)
    fresh.remove(4)
    fresh.add(5, "bob", response, 60)
    assert len(fresh) == 2


def _job(job_id: int, **changes: Any) -> Job:
    return new_job(headers=(), **changes).accepted(job_id)


class SlowOnTheReader(set[int]):
    """`JobStore._taken` whose check on the reader's thread (`_claim_result`) answers,
    then waits for `release` before the read goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.checked = threading.Event()

    def __contains__(self, item: object) -> bool:
        found = super().__contains__(item)
        if threading.current_thread() is not threading.main_thread():
            self.checked.set()
            self.release.wait(5)
        return found


async def test_a_result_that_commits_while_a_take_reads_is_handed_out_once(
    tmp_path: Path,
) -> None:
    """A job the copy in memory does not know (as after a restart) is taken by a
    read in the file, and its result commits after that read checked it was not
    taken, before the read found it done. The finish puts the result in the copy of
    fresh results: a second take must not get it from there, as the read claims it."""
    first = await JobStore.open(tmp_path)
    job_id = await first.accept(new_job(user="alice"))
    await first.close()
    store = await JobStore.open(tmp_path)
    try:
        assert await store.mark_submitted(job_id, "u1") is Mark.SUBMITTED
        taken = store._taken = SlowOnTheReader()
        reading = asyncio.ensure_future(store.take_result(job_id, "alice"))
        await asyncio.to_thread(taken.checked.wait, 5)
        assert await store.finish(job_id, RESULT)
        second = store.take_result_now(job_id, "alice")
        taken.release.set()
        outcomes = [await reading]
        outcomes.append(await store.take_result(job_id, "alice") if second is UNKNOWN else second)
        assert sorted(map(repr, outcomes)) == sorted(map(repr, [RESULT, None]))
    finally:
        await store.close()


async def test_a_read_of_the_file_hands_out_a_bounded_amount_of_bodies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many jobs the dispatcher asks for, a read of the file hands out jobs
    up to HAND_OUT_MAX_BYTES of bodies, the first whatever its size (and those the
    copy in memory keeps, within READY_MAX_BYTES); the rest come at the next asks,
    in order."""
    monkeypatch.setattr(dispatching, "HAND_OUT_MAX_BYTES", 5 * MIB)
    first = await JobStore.open(tmp_path)
    ids = [await first.accept(new_job(body=b"b" * size)) for size in (6 * MIB,) + (2 * MIB,) * 3]
    await first.close()
    store = await JobStore.open(tmp_path)  # (nothing in memory: the file is read)
    try:
        handed: list[list[int]] = []
        claimed: list[int] = []
        while len(claimed) < len(ids):
            jobs = await store.next_accepted(64, claimed)
            handed.append([job.id for job in jobs])
            claimed.extend(handed[-1])
        assert handed == [ids[:1], ids[1:3], ids[3:]]
    finally:
        await store.close()

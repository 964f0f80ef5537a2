"""Contract tests of the store's retention on real SQLite files: result sizes, the
running total of stored result bytes, expiry by finish time, eviction by age under
a byte cap, the index they use, and the migration that adds them."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from storage import JobState, JobStore, Mark, Removed, StoredResponse, schema, sql
from tests.test_store import new_job, raw_rows


def result(size: int) -> StoredResponse:
    """A result whose stored size is exactly `size` bytes (headers JSON + body)."""
    headers = (("Content-Type", "text/plain"),)
    overhead = len(json.dumps([list(h) for h in headers], separators=(",", ":")))
    assert size >= overhead
    return StoredResponse(200, headers, b"x" * (size - overhead))


def stored_sum(data: Path) -> int:
    [(total,)] = raw_rows(data, "SELECT coalesce(sum(rsize), 0) FROM jobs WHERE state = 'done'")
    return int(total)


def ids_in_file(data: Path) -> list[int]:
    return [row[0] for row in raw_rows(data, "SELECT id FROM jobs ORDER BY id")]


async def finished_job(store: JobStore, size: int, **changes: Any) -> int:
    job_id = await store.accept(new_job(**changes))
    assert await store.finish(job_id, result(size))
    return job_id


async def test_result_bytes_follow_every_write_and_survive_reopen(
    store: JobStore, data: Path
) -> None:
    assert store.result_bytes == 0
    a = await finished_job(store, 300)
    b = await finished_job(store, 500, user="bob")
    await finished_job(store, 700)
    forgotten = await store.accept(new_job())
    assert await store.delete(forgotten, None)  # forgotten: its result is never kept
    assert await store.finish(forgotten, result(10_000))
    await store.accept(new_job())  # unfinished: no result yet
    assert store.result_bytes == 1500 == stored_sum(data)
    assert raw_rows(data, "SELECT rsize FROM jobs WHERE id = ?", a) == [(300,)]

    taken = await store.take_result(a, None)
    assert isinstance(taken, StoredResponse)
    assert taken == result(300)
    await store.flush()  # the delete commits in the background
    assert store.result_bytes == 1200 == stored_sum(data)
    assert await store.delete(b, None)
    assert store.result_bytes == 700 == stored_sum(data)

    await store.close()
    store = await JobStore.open(data)  # summed again from the file
    try:
        assert store.result_bytes == 700
        await finished_job(store, 100)
        # two done jobs, and the unfinished one forgotten
        assert await store.delete_expired(None, time.time() + 1) == 3
        assert store.result_bytes == 0 == stored_sum(data)
        await finished_job(store, 50)
        assert await store.delete_all("alice") == 1
        assert store.result_bytes == 0
    finally:
        await store.close()


async def test_a_listener_hears_of_each_stored_result_only(store: JobStore) -> None:
    heard: list[int] = []
    store.set_result_listener(lambda: heard.append(store.result_bytes))
    await finished_job(store, 100)
    forgotten = await store.accept(new_job())
    await store.delete(forgotten, None)
    await store.finish(forgotten, result(100))
    assert not await store.finish(forgotten, result(100))  # gone: nothing stored
    await finished_job(store, 200)
    assert heard == [100, 300]  # called after the commit, with the total already counted
    store.set_result_listener(None)
    await finished_job(store, 100)
    assert heard == [100, 300]


async def test_expire_removes_only_done_jobs_finished_before_the_stamp(
    store: JobStore, data: Path
) -> None:
    # Unfinished jobs created long ago are never expired, whatever their state or mode.
    accepted = await store.accept(new_job(created=1.0))
    submitted = await store.accept(new_job(created=1.0))
    assert await store.mark_submitted(submitted, "u1") is Mark.SUBMITTED
    forgotten = await store.accept(new_job(created=1.0))
    assert await store.delete(forgotten, None)
    old = [await finished_job(store, 100), await finished_job(store, 200, user="bob")]
    await asyncio.sleep(0.01)  # a stamp strictly between the two groups
    stamp = time.time()
    await asyncio.sleep(0.01)
    young = await finished_job(store, 400)

    commits = store.commits
    assert await store.expire_results(1.0) == Removed(0, 0)
    assert store.commits == commits  # nothing due: one index probe, no write

    assert await store.expire_results(stamp) == Removed(2, 300)
    assert ids_in_file(data) == [accepted, submitted, forgotten, young]
    assert store.result_bytes == 400 == stored_sum(data)
    for job_id in old:
        assert await store.state(job_id, None) is None
    assert await store.state(accepted, None) is JobState.ACCEPTED
    assert await store.state(submitted, None) is JobState.SUBMITTED
    assert store.unfinished == 3


async def test_expire_works_in_chunks(store: JobStore, data: Path) -> None:
    done = [await finished_job(store, 100 + i) for i in range(5)]
    pending = await store.accept(new_job())
    commits = store.commits
    assert await store.expire_results(time.time() + 1, chunk=2) == Removed(5, 510)
    assert store.commits - commits == 3  # 2 + 2 + 1, each its own short write
    assert ids_in_file(data) == [pending]
    assert len(done) == 5


async def test_evict_removes_the_oldest_results_until_under_the_cap(
    store: JobStore, data: Path
) -> None:
    pending = await store.accept(new_job(created=1.0))
    _, b, c, d = [await finished_job(store, size) for size in (100, 200, 300, 400)]
    commits = store.commits
    assert await store.evict_results(1000) == Removed(0, 0)  # exactly at the cap
    assert store.commits == commits

    assert await store.evict_results(999) == Removed(1, 100)
    assert ids_in_file(data) == [pending, b, c, d]
    # 900 stored; a cap of 450 needs 450 gone: b and c (500), never more than that.
    assert await store.evict_results(450) == Removed(2, 500)
    assert ids_in_file(data) == [pending, d]
    assert store.result_bytes == 400 == stored_sum(data)
    # A result larger than the whole cap goes too: the cap holds.
    assert await store.evict_results(399) == Removed(1, 400)
    assert await store.evict_results(0) == Removed(0, 0)  # only the unfinished job is left
    assert ids_in_file(data) == [pending]
    assert await store.state(pending, None) is JobState.ACCEPTED


async def test_evict_works_in_chunks_and_by_finish_time_not_id(store: JobStore, data: Path) -> None:
    first_accepted = await store.accept(new_job())
    others = [await finished_job(store, 100) for _ in range(5)]
    assert await store.finish(first_accepted, result(100))  # finished last: evicted last
    assert await store.evict_results(100, chunk=2) == Removed(5, 500)
    assert ids_in_file(data) == [first_accepted]
    assert len(others) == 5


async def test_concurrent_fetches_and_evictions_keep_the_total_exact(
    store: JobStore, data: Path
) -> None:
    ids = [await finished_job(store, 100 + i) for i in range(40)]
    outcomes = await asyncio.gather(
        *(store.take_result(job_id, None) for job_id in ids[::3]),
        store.evict_results(1500, chunk=3),
        *(store.take_result(job_id, None) for job_id in ids[1::3]),
        store.expire_results(0.0),
    )
    await store.flush()
    assert store.result_bytes == stored_sum(data) <= 1500
    taken = [o for o in outcomes if isinstance(o, StoredResponse)]
    removed = next(o for o in outcomes if isinstance(o, Removed))
    kept = len(ids_in_file(data))
    assert len({o.body for o in taken}) == len(taken)  # none handed out twice
    assert len(taken) + kept <= 40
    # none lost; a result handed out while a sweep removed it counts as removed too
    assert len(taken) + removed.count + kept >= 40


def plan(data: Path, query: str, params: dict[str, Any]) -> list[str]:
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        found = db.execute(f"EXPLAIN QUERY PLAN {query}", params).fetchall()
    db.close()
    return [row[-1] for row in found]


@pytest.mark.parametrize(
    ("query", "params"),
    [
        (sql.RESULT_BYTES, {}),
        (sql.OLDEST_FINISHED, {}),
        (sql.EXPIRE, {"stamp": 1.0, "limit": 10}),
        (sql.EVICT, {"excess": 1, "limit": 10}),
    ],
)
async def test_retention_reads_done_jobs_through_their_index(
    store: JobStore, data: Path, query: str, params: dict[str, Any]
) -> None:
    for _ in range(3):
        await store.accept(new_job())
        await finished_job(store, 100)
    steps = plan(data, query, params)
    assert any("jobs_done_finished" in step for step in steps), steps
    # No step reads the jobs table itself row by row: an index, or the primary key.
    for step in steps:
        if step.startswith(("SCAN jobs", "SEARCH jobs")):
            assert "INDEX" in step or "PRIMARY KEY" in step, steps


async def make_version_1_store(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data folder as the previous proxy left it: schema 1, with jobs in every state."""
    os.mkdir(data, 0o700)
    path = data / "jobs.sqlite3"
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        patch.setattr(schema, "LATEST", 1)
        async with aiosqlite.connect(path, isolation_level=None) as adb:
            await schema.prepare(adb, path, "FULL")
    columns = "id, mode, state, user, database, method, target, headers, auth, body, created"
    with sqlite3.connect(path) as db:
        for job_id, state, method in [(1, "accepted", "POST"), (2, "submitted", "GET")]:
            db.execute(
                f"INSERT INTO jobs ({columns}, upstream_id)"
                " VALUES (?, 'store', ?, 'alice', '_system', ?, '/_api/version', '[]',"
                " 'Basic x', x'', 1.0, ?)",
                (job_id, state, method, "u7" if state == "submitted" else None),
            )
        for job_id, size in [(3, 120), (4, 80)]:
            response = result(size)
            db.execute(
                f"INSERT INTO jobs ({columns}, finished, status, rheaders, rbody)"
                " VALUES (?, 'store', 'done', ?, '_system', 'GET', '/', NULL, NULL, NULL,"
                " 1.0, ?, 200, ?, ?)",
                (
                    job_id,
                    f"u{size}",
                    float(job_id),
                    json.dumps([list(h) for h in response.headers], separators=(",", ":")),
                    response.body,
                ),
            )
    db.close()
    assert raw_rows(data, "PRAGMA user_version") == [(1,)]
    assert "rsize" not in [row[1] for row in raw_rows(data, "PRAGMA table_info(jobs)")]


async def test_a_version_1_store_is_migrated_in_place_with_its_jobs(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_version_1_store(data, monkeypatch)
    store = await JobStore.open(data)
    try:
        assert raw_rows(data, "PRAGMA user_version") == [(schema.LATEST,)]
        assert raw_rows(data, "SELECT id, rsize FROM jobs ORDER BY id") == [
            (1, None),
            (2, None),
            (3, 120),
            (4, 80),
        ]
        assert store.result_bytes == 200
        assert store.unfinished == 2
        [accepted] = await store.next_accepted(10)
        assert (accepted.id, accepted.auth, accepted.target) == (1, "Basic x", "/_api/version")
        [submitted] = await store.submitted()
        assert (submitted.id, submitted.upstream_id, submitted.method) == (2, "u7", "GET")
        assert raw_rows(data, "SELECT id FROM jobs WHERE cancelled") == []
        assert await store.cancel_submitted(2, "u7")
        assert not await store.requeue(2, "u7")
        assert await store.list_ids(done=True, viewer=None, limit=10) == [3, 4]
        assert await store.take_result(4, "u80") == result(80)
        assert await store.evict_results(0) == Removed(1, 120)
        assert await store.accept(new_job()) == 5  # ids go on where they were
        assert await store.finish(2, result(100), from_states=(JobState.SUBMITTED,))
        assert store.result_bytes == 100 == stored_sum(data)
    finally:
        await store.close()

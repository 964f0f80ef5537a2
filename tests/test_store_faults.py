"""Faults the writer must survive: a full disk, a busy database, callers that give up."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from storage import JobState, JobStore, Mark, StoredResponse, StoreError, StoreFull
from storage.batch import Statement, Want
from tests.test_store import RESULT, new_job


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    store = await JobStore.open(tmp_path, capacity=10)
    yield store
    await store.close()


@pytest.fixture
def other_writer(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A second SQLite connection to the file, to hold its write lock as another process could."""
    db = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    yield db
    db.close()


async def writer_took_everything(store: JobStore) -> None:
    """Wait until the writer has taken all queued writes into its current batch.

    The writer's thread takes a batch from its queue and issues BEGIN next, so once the
    queue is empty, the batch is running (here: waiting for the other writer's lock).
    """
    for _ in range(1000):
        await asyncio.sleep(0.001)  # let tasks just created queue their writes, the writer run
        if not store._writer._queue:
            return
    raise AssertionError("the writer did not take the queued writes")


async def test_a_full_disk_fails_only_its_batch_and_the_store_recovers(store: JobStore) -> None:
    first = await store.accept(new_job())
    db = store._writer
    # The fault is real: SQLite's own page limit makes the next growing write fail with
    # SQLITE_FULL ("database or disk is full"), exactly as a full disk would.
    [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
    await db.execute_fetchall(f"PRAGMA max_page_count = {pages}")
    commits = store.commits
    big = new_job(body=b"x" * 300_000)
    outcomes = await asyncio.gather(
        store.accept(big),
        store.accept(new_job()),
        store.mark_submitted(first, "1"),
        return_exceptions=True,
    )
    for outcome in outcomes:
        assert isinstance(outcome, StoreError), outcome
        assert "could not commit 3 write(s): database or disk is full" in str(outcome)
        assert isinstance(outcome.__cause__, sqlite3.Error)
    assert store.commits == commits
    assert store.unfinished == 1
    assert await store.state(first, None) is JobState.ACCEPTED  # the batch was rolled back

    # Later batches run as usual; once there is room again they succeed.
    with pytest.raises(StoreError, match="disk is full"):
        await store.accept(big)
    await db.execute_fetchall("PRAGMA max_page_count = 1073741823")
    job_id = await store.accept(big)
    assert job_id > first + 3  # ids of failed batches are burnt, never reused
    assert await store.mark_submitted(first, "1") is Mark.SUBMITTED
    assert store.unfinished == 2
    # Failed accepts gave back their capacity: 8 more fit, the 9th does not.
    for _ in range(8):
        await store.accept(new_job())
    assert store.unfinished == 10


async def test_a_busy_database_fails_the_batch_and_the_store_recovers(
    store: JobStore, other_writer: sqlite3.Connection
) -> None:
    await store._writer.execute_fetchall("PRAGMA busy_timeout = 100")  # not 5 s in a test
    other_writer.execute("BEGIN IMMEDIATE")
    failing = asyncio.create_task(store.accept(new_job()))
    given_up = asyncio.create_task(store.accept(new_job()))
    await writer_took_everything(store)
    given_up.cancel()
    with pytest.raises(StoreError, match="database is locked") as failure:
        await failing
    assert isinstance(failure.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(asyncio.CancelledError):
        await given_up
    other_writer.execute("ROLLBACK")
    assert await store.accept(new_job()) == 3
    assert store.unfinished == 1


async def test_a_batch_holds_at_most_1024_writes(store: JobStore) -> None:
    store._capacity = 0  # this test is about batch size, not capacity
    commits = store.commits
    release = threading.Event()
    held = store._writer.call(lambda _conn: release.wait())  # the writer's thread is busy...
    accepts = [asyncio.ensure_future(store.accept(new_job())) for _ in range(1500)]
    await asyncio.sleep(0.01)  # ...while all 1500 are queued
    release.set()
    assert await held
    assert await asyncio.gather(*accepts) == list(range(1, 1501))
    assert store.commits - commits == 2


async def test_a_read_that_fails_raises_store_error(
    store: JobStore, other_writer: sqlite3.Connection
) -> None:
    await store.accept(new_job())
    # Real damage from outside: someone drops the table under the running store.
    other_writer.execute("DROP TABLE jobs")
    with pytest.raises(StoreError, match="could not read: no such table: jobs") as failure:
        await store.list_ids(done=False, viewer=None, limit=10)  # (state(1) is in memory)
    assert isinstance(failure.value.__cause__, sqlite3.OperationalError)


async def test_a_write_given_up_before_its_batch_starts_is_skipped(
    store: JobStore, other_writer: sqlite3.Connection
) -> None:
    other_writer.execute("BEGIN IMMEDIATE")
    blocked = asyncio.create_task(store.accept(new_job()))
    await writer_took_everything(store)
    given_up = asyncio.create_task(store.accept(new_job()))
    await asyncio.sleep(0)  # queued behind the blocked batch
    given_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await given_up
    commits = store.commits
    other_writer.execute("ROLLBACK")
    assert await blocked == 1
    assert await store.finish(1, RESULT)  # a later write: the skipped one has been handled
    assert store.commits == commits + 2  # the skipped write made no transaction of its own
    assert await store.state(2, None) is None
    assert store.unfinished == 0
    for _ in range(10):  # it gave its capacity back
        await store.accept(new_job())


async def test_a_result_given_up_before_its_batch_starts_is_not_stored(
    store: JobStore, other_writer: sqlite3.Connection
) -> None:
    """finish_nowait (the worker process's results, stored without a task): its
    future cancelled, as a cancelled finish, drops the write; a job id that cannot be
    is answered at once, and a from_state of done is refused at once."""
    job_id = await store.accept(new_job())
    other_writer.execute("BEGIN IMMEDIATE")
    blocked = asyncio.create_task(store.accept(new_job()))
    await writer_took_everything(store)
    given_up = store.finish_nowait(job_id, RESULT)
    given_up.cancel()
    await asyncio.sleep(0)  # (the write's own future hears of it a turn later)
    other_writer.execute("ROLLBACK")
    assert await blocked == 2
    await store.flush()
    assert await store.state(job_id, None) is JobState.ACCEPTED
    stored = store.finish_nowait(job_id, RESULT)
    assert not stored.done()
    assert await stored
    assert not await store.finish_nowait(job_id, RESULT)  # done already
    nothing = store.finish_nowait(0, RESULT)
    assert nothing.done()
    assert not nothing.result()
    with pytest.raises(ValueError, match="DONE"):
        store.finish_nowait(job_id, RESULT, from_states=(JobState.DONE,))


async def test_a_write_given_up_while_it_commits_is_still_counted(
    store: JobStore, other_writer: sqlite3.Connection
) -> None:
    other_writer.execute("BEGIN IMMEDIATE")
    accept = asyncio.create_task(store.accept(new_job()))
    await writer_took_everything(store)
    accept.cancel()
    with pytest.raises(asyncio.CancelledError):
        await accept
    other_writer.execute("ROLLBACK")
    assert await store.accept(new_job()) == 2
    # The cancelled caller never learnt its id, but the job was committed and counts.
    assert await store.state(1, None) is JobState.ACCEPTED
    assert store.unfinished == 2


async def test_a_cancelled_writer_task_still_commits_what_was_queued(
    store: JobStore, other_writer: sqlite3.Connection
) -> None:
    other_writer.execute("BEGIN IMMEDIATE")
    running = asyncio.create_task(store.accept(new_job()))
    await writer_took_everything(store)
    queued = asyncio.create_task(store.accept(new_job()))
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())  # a shutdown has begun...
    await asyncio.sleep(0)
    store._writer._task.cancel()  # ...and the loop cancels what is left, as asyncio.run() does
    with pytest.raises(StoreError, match="closed"):
        await store.accept(new_job())
    other_writer.execute("ROLLBACK")
    # The batch under way cannot be cut short on its thread: it commits, and so does
    # what was queued before the stop; nothing waits forever.
    assert await running == 1
    assert await queued == 2
    await closing
    assert store.commits == 2


async def test_a_size_limit_below_the_file_keeps_it_from_growing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_size"):
        await JobStore.open(tmp_path, max_size=-1)
    store = await JobStore.open(tmp_path)
    for _ in range(20):
        await store.accept(new_job(body=b"b" * 10_000))
    await store.close()
    size = (tmp_path / "jobs.sqlite3").stat().st_size
    # SQLite never caps a file below its size: the limit here is "no growth",
    # and new jobs are refused until finished jobs make room.
    store = await JobStore.open(tmp_path, max_size=4096)
    try:
        with pytest.raises(StoreFull, match="near its size limit"):
            await store.accept(new_job())
        assert await store.finish(1, RESULT)
        assert await store.take_result(1, None) == RESULT
        assert (tmp_path / "jobs.sqlite3").stat().st_size == size
    finally:
        await store.close()


async def test_a_burst_at_the_size_limit_counts_the_jobs_not_committed_yet(
    tmp_path: Path,
) -> None:
    """Accepts that queue behind a commit under way pass the size check before any of
    them is on disk: they count towards it as they queue, so a burst cannot fill the
    reserve that jobs already held need to move on (their results)."""
    limit = 256 * 1024
    store = await JobStore.open(tmp_path, max_size=limit)
    release = threading.Event()
    try:
        held = store._writer.call(lambda _conn: release.wait())  # nothing commits meanwhile
        queued: list[asyncio.Future[object]] = []
        refused: StoreFull | None = None
        try:
            for _ in range(40):  # 40 x 12 KB: twice the limit
                queued.append(store.accept_nowait(new_job(body=b"b" * 12_000))[1])
        except StoreFull as exc:
            refused = exc
        finally:
            release.set()
            await held
        assert refused is not None
        assert "near its size limit" in str(refused)
        # what was let through fits in the three quarters new jobs may fill
        assert 0 < len(queued) * 12_000 <= limit * 3 // 4
        await asyncio.gather(*queued)  # all of them commit
        # and each can move on with a result as large as its request
        big = StoredResponse(status=201, headers=(), body=b"r" * 12_000)
        for job_id in range(1, len(queued) + 1):
            assert await store.finish(job_id, big)
    finally:
        release.set()
        await store.close()


@pytest.mark.parametrize("max_size", [2**45, 2**63 - 1])
async def test_a_size_limit_beyond_what_sqlite_allows_is_sqlites(
    tmp_path: Path, max_size: int
) -> None:
    """SQLite allows at most 4,294,967,294 pages: a larger limit (2**63 - 1 for "no
    limit", say) is that one, and jobs are taken (they were all refused as too large)."""
    store = await JobStore.open(tmp_path, max_size=max_size)
    try:
        job_id = await store.accept(new_job(body=b"b" * 10_000))
        assert await store.finish(job_id, RESULT)
        assert await store.take_result(job_id, None) == RESULT
    finally:
        await store.close()


async def test_on_durable_runs_on_the_writers_thread_once_the_job_is_committed(
    store: JobStore, tmp_path: Path
) -> None:
    """The fast path sends a 202 from there: the job must be in the file by then (another
    connection reads it), and the event loop need not have heard of the commit yet."""
    seen: list[tuple[int, bool, list[tuple[int]]]] = []

    def on_durable(job_id: int) -> None:
        on_loop = threading.current_thread() is threading.main_thread()
        with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3")) as other:
            rows = other.execute("SELECT id FROM jobs WHERE id = ?", (job_id,)).fetchall()
        seen.append((job_id, on_loop, rows))

    job_id = await store.accept(new_job(), on_durable)
    assert seen == [(job_id, False, [(job_id,)])]


async def test_on_durable_is_not_called_for_a_batch_that_fails(store: JobStore) -> None:
    db = store._writer
    [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
    await db.execute_fetchall(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL, as above
    called: list[int] = []
    with pytest.raises(StoreError, match="disk is full"):
        await store.accept(new_job(body=b"x" * 300_000), called.append)
    await db.execute_fetchall("PRAGMA max_page_count = 1073741823")
    job_id = await store.accept(new_job(), called.append)
    assert called == [job_id]


async def test_an_on_durable_that_fails_does_not_fail_the_write(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_job_id: int) -> None:
        raise RuntimeError("boom")

    job_id = await store.accept(new_job(), broken)
    assert await store.state(job_id, None) is JobState.ACCEPTED
    assert "a commit's on_durable failed" in caplog.text
    assert await store.accept(new_job()) == job_id + 1


async def test_a_failing_callback_leaves_no_write_of_its_batch_unanswered(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    """on_commit and on_abort are the store's own bookkeeping; a bug in one must not
    strand the callers of the other writes committed (or skipped) in the same batch."""

    def broken(*_args: object) -> None:
        raise RuntimeError("bookkeeping bug")

    writer = store._writer
    await writer.execute_fetchall("CREATE TABLE scratch (key TEXT)")
    insert = Statement("INSERT INTO scratch (key) VALUES (?)", ("k1",))
    release = threading.Event()
    held = writer.call(lambda _conn: release.wait())  # one batch for everything below
    gave_up = writer.enqueue(insert, on_abort=broken)
    first = writer.enqueue(insert, want=Want.ROWCOUNT, on_commit=broken)
    second = writer.enqueue(Statement(insert.sql, ("k2",)), want=Want.ROWCOUNT)
    gave_up.cancel()
    release.set()
    assert await held
    # both committed: the failing callback is logged, its write and the next answered
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 5)) == [1, 1]
    rows = await writer.execute_fetchall("SELECT key FROM scratch")
    assert sorted(key for (key,) in rows) == ["k1", "k2"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "a write's on_abort failed",
        "a commit's on_commit failed",
    ]


async def test_a_held_result_goes_in_the_write_that_copies_it_so_a_full_store_has_room(
    store: JobStore, tmp_path: Path
) -> None:
    """A fetch run as a job stores the result it took as its own: the copy needs as
    many pages as the result, and the taken row's delete, in the same write, frees
    them first. As two writes, the copy would wait for room the delete never makes."""
    fetched = await store.accept(new_job())
    big = StoredResponse(200, (("Content-Type", "application/json"),), b"x" * 200_000)
    assert await store.finish(fetched, big)
    fetch = await store.accept(new_job(method="PUT", target=f"/_api/job/{fetched}"))
    taken = await store.take_result(fetched, None, hold=True)
    assert taken == big
    assert await store.state(fetched, None) is None  # (held: gone for every reader)
    db = store._writer
    [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
    await db.execute_fetchall(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="disk is full"):
        await store.finish(fetch, taken)  # the copy alone does not fit
    assert await store.finish(fetch, taken, taking=fetched)
    await db.execute_fetchall("PRAGMA max_page_count = 1073741823")
    assert await store.take_result(fetch, None) == big
    assert await store.take_result(fetched, None) is None
    await store.flush()
    assert store.result_bytes == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3")) as plain:
        assert plain.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


async def test_a_held_result_is_back_when_its_taker_does_not_finish(store: JobStore) -> None:
    fetched = await store.accept(new_job())
    assert await store.finish(fetched, RESULT)
    fetch = await store.accept(new_job(method="PUT", target=f"/_api/job/{fetched}"))
    assert await store.finish(fetch, RESULT)  # (done already: another run stored it)
    assert await store.take_result(fetched, None, hold=True) == RESULT
    assert not await store.finish(fetch, RESULT, taking=fetched)
    assert await store.state(fetched, None) is JobState.DONE
    assert await store.take_result(fetched, None) == RESULT

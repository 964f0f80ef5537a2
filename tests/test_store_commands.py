"""Commands (storage.sql): the writes made for every job, batched as one statement.

Marking a job submitted, storing its result and deleting a fetched result run as
INSERTs into views whose triggers do the write and record its outcome; the writer
runs the consecutive ones of a batch as one multi-row INSERT and reads every
outcome at once. These tests hold that a batch does exactly what the same writes
do one at a time (results, rows, counters), whatever the mix: repeated ids, jobs
in the wrong state, forgotten jobs, text that is not UTF-8; and that it takes a
few statements, not one or two per write.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from storage import JobMode, JobState, JobStore, StoredResponse
from storage.batch import OUTCOME_TABLE, OUTCOMES, Statement, Want, Write, _collect_outcomes
from storage.store import UNKNOWN
from tests.test_store import new_job, raw_rows

USERS = ("alice", "bob", "b\udcffb")  # the last is no UTF-8: stored as a BLOB
UPSTREAM_IDS = ("17", "18", "up\udcff")
ROWS = (
    "SELECT id, mode, state, user, upstream_id, cancelled, status, rheaders, rbody, rsize,"
    " auth, headers, body, finished IS NULL, attempts FROM jobs ORDER BY id"
)

DONE_BYTES = "SELECT coalesce(sum(rsize), 0) FROM jobs WHERE state = 'done'"

Op = tuple[str, tuple[Any, ...]]


async def set_up(store: JobStore) -> None:
    """The same jobs in every state, in either store."""
    for i in range(12):
        await store.accept(
            new_job(user=USERS[i % 3], mode=JobMode.FORGET if i % 4 == 3 else JobMode.STORE)
        )
    for job_id in (1, 2, 3, 4, 5, 6):
        await store.mark_submitted(job_id, UPSTREAM_IDS[job_id % 3])
    for job_id in (1, 2, 7):
        await store.finish(job_id, result(job_id))


def result(n: int) -> StoredResponse:
    return StoredResponse(status=200 + n % 5, headers=(("X-N", str(n)),), body=bytes([n]) * n)


def random_ops(rng: random.Random) -> list[Op]:
    """Writes on ids 1-14 (13 and 14 do not exist yet), many of them in the wrong state.
    Fetches only of results stored by the set-up: a fetch reads the copies in memory,
    which a write of the same batch changes only once the batch commits."""
    ops: list[Op] = []
    for _ in range(40):
        job_id = rng.randint(1, 14)
        kind = rng.choice(("mark", "finish", "finish", "take", "accept"))
        if kind == "mark":
            ops.append((kind, (job_id, rng.choice(UPSTREAM_IDS))))
        elif kind == "finish":
            states = rng.choice([(JobState.ACCEPTED,), (JobState.SUBMITTED,), tuple(JobState)[:2]])
            upstream_id = rng.choice((None, *UPSTREAM_IDS))
            ops.append((kind, (job_id, result(rng.randint(0, 30)), states, upstream_id)))
        elif kind == "take":
            ops.append((kind, (rng.choice((1, 2, 7)), rng.choice((None, *USERS)))))
        else:
            ops.append((kind, (rng.choice(USERS),)))
    return ops


async def run(store: JobStore, op: Op) -> Any:
    kind, args = op
    if kind == "mark":
        return await store.mark_submitted(*args)
    if kind == "finish":
        job_id, response, states, upstream_id = args
        return await store.finish(job_id, response, from_states=states, upstream_id=upstream_id)
    if kind == "take":
        return take_now(store, *args)
    return await store.accept(new_job(user=args[0]))


def take_now(store: JobStore, job_id: int, viewer: str | None) -> Any:
    """A fetch answered from the copies in memory (its delete, a command, queued at
    once); None for a result gone (UNKNOWN: no copy, and none in the file either)."""
    outcome = store.take_result_now(job_id, viewer)
    return None if outcome is UNKNOWN else outcome


async def settle(store: JobStore) -> None:
    """Until the deletes of taken results have committed."""
    await store.flush()
    assert not store._taken


@pytest.mark.parametrize("seed", range(12))
async def test_a_batch_of_commands_does_what_they_do_one_at_a_time(
    tmp_path: Path, seed: int
) -> None:
    batched = await JobStore.open(tmp_path / "batched")
    one_by_one = await JobStore.open(tmp_path / "one-by-one")
    try:
        for store in (batched, one_by_one):
            await set_up(store)
            await settle(store)
        ops = random_ops(random.Random(seed))

        commits = batched.commits
        release = threading.Event()
        held = batched._writer.call(lambda _conn: release.wait())  # one batch for all
        calls = [asyncio.ensure_future(run(batched, op)) for op in ops]
        await asyncio.sleep(0.01)
        release.set()
        await held
        in_batch = await asyncio.gather(*calls)
        await settle(batched)
        assert batched.commits - commits <= 2  # the batch, and deletes queued by takes

        alone = []
        for op in ops:
            alone.append(await run(one_by_one, op))
            await settle(one_by_one)

        assert in_batch == alone
        for store, name in ((batched, "batched"), (one_by_one, "one-by-one")):
            [(stored,)] = raw_rows(tmp_path / name, DONE_BYTES)
            assert store._result_bytes == stored
        assert (batched.unfinished, batched._result_bytes) == (
            one_by_one.unfinished,
            one_by_one._result_bytes,
        )
    finally:
        await batched.close()
        await one_by_one.close()
    assert raw_rows(tmp_path / "batched", ROWS) == raw_rows(tmp_path / "one-by-one", ROWS)


async def test_a_hundred_results_stored_take_a_few_statements(store: JobStore) -> None:
    ids = [await store.accept(new_job()) for _ in range(100)]
    traced: list[str] = []
    await store._writer.call(lambda conn: conn.set_trace_callback(traced.append))
    release = threading.Event()
    held = store._writer.call(lambda _conn: release.wait())
    finishes = [asyncio.ensure_future(store.finish(i, result(i))) for i in ids]
    await asyncio.sleep(0.01)
    release.set()
    await held
    assert await asyncio.gather(*finishes) == [True] * 100
    # Each statement run from Python, once: the trace repeats it for every trigger run.
    statements = [sql for sql, _ in itertools.groupby(traced)]
    # BEGIN, two INSERTs (64 + 36 rows), the outcomes read and cleared, COMMIT
    assert len(statements) == 6, [sql[:40] for sql in statements]
    assert store.unfinished == 0


async def test_a_command_is_one_statement_with_a_values_group(store: JobStore) -> None:
    with pytest.raises(ValueError, match="a write of its own"):
        store._writer.enqueue(Statement("INSERT INTO t VALUES (?)", (1,)), want=Want.OUTCOME)


def read_outcomes(rows: list[tuple[Any, ...]]) -> list[Any]:
    """`rows` put in an outcome table and read back as the writer reads the outcomes of
    a batch of three commands (k 0-2)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(OUTCOME_TABLE)
    conn.executemany("INSERT INTO outcome (k, a, b, c) VALUES (?, ?, ?, ?)", rows)
    command = Statement("INSERT INTO v (k) VALUES (?)", (), values="(?)")
    future = asyncio.get_running_loop().create_future()
    writes = [Write((command,), Want.OUTCOME, future, None, None) for _ in range(3)]
    results: list[Any] = [None] * len(writes)
    _collect_outcomes(conn, writes, results)
    return results


async def test_outcome_values_cross_exactly() -> None:
    text = 'd\u00e9j\u00e0 "q" \\ \n\x01 [1] \U0001f600'
    rows = [
        (0, None, -42, 2**63 - 1),
        (0, text, b"\x00\xff", '["00"]'),  # (text that looks like JSON stays text)
        (2, -(2**63), "", b""),
    ]
    assert read_outcomes(rows) == [
        [(None, -42, 2**63 - 1), (text, b"\x00\xff", '["00"]')],
        [],
        [(-(2**63), "", b"")],
    ]
    assert OUTCOMES.count("?") == 0  # (one statement, nothing bound)
    with pytest.raises(ValueError, match="real"):
        read_outcomes([(1, "store", 1.5, None)])


def sqlite_memory() -> int:
    """Bytes SQLite holds in this process (its own allocator's count)."""
    library = ctypes.util.find_library("sqlite3")
    if library is None:
        pytest.skip("SQLite is not a shared library here: its memory cannot be read")
    used = ctypes.CDLL(library).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return int(used())


async def test_the_writers_statements_keep_no_jobs_or_results(store: JobStore) -> None:
    """A cached statement keeps the values of its last run until the next: those of
    many rows must not keep the bodies of as many jobs and results (a run of each
    row count 1-64, with 256 KiB bodies, would keep 64 MiB)."""
    before = sqlite_memory()
    big = bytes(256 * 1024)
    ids: list[int] = []
    for count in (1, 2, 3, 5, 9, 17, 33, 64):
        release = threading.Event()
        held = store._writer.call(lambda _conn: release.wait())  # noqa: B023 - awaited here
        accepts = [asyncio.ensure_future(store.accept(new_job(body=big))) for _ in range(count)]
        await asyncio.sleep(0.01)
        release.set()
        await held
        ids += await asyncio.gather(*accepts)
    results = [store.finish(i, StoredResponse(200, (), big)) for i in ids]
    assert await asyncio.gather(*results) == [True] * len(ids)
    # (what is left: the page caches of both connections, a few MiB)
    assert sqlite_memory() - before < 16 * 1024 * 1024

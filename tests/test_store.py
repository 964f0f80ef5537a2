"""Contract tests of JobStore on real SQLite files: every method and state transition."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from storage import (
    Answering,
    CapacityExceeded,
    JobMode,
    JobState,
    JobStore,
    Mark,
    NewJob,
    ResultTooLarge,
    StoredResponse,
    StoreError,
    core,
    rows,
    schema,
    writer,
)
from storage.batch import Statement, Want

RESULT = StoredResponse(
    status=201, headers=(("Content-Type", "application/json"),), body=b'{"a":1}'
)


def new_job(**changes: Any) -> NewJob:
    job = NewJob(
        mode=JobMode.STORE,
        user="alice",
        database="_system",
        method="POST",
        target="/_api/document/c?waitForSync=true",
        headers=(("Content-Type", "application/json"), ("X-Dup", "1"), ("X-Dup", "2")),
        auth="Basic YWxpY2U6c2VjcmV0",
        body=b'{"_key":"k"}',
        created=1_700_000_000.5,
    )
    return replace(job, **changes)


def raw_rows(data: Path, sql: str, *params: Any) -> list[Any]:
    """Look at the file directly, as an operator (or an attacker) could."""
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        return db.execute(sql, params).fetchall()


async def test_accept_stores_the_job_with_increasing_ids_from_1(store: JobStore) -> None:
    ids = [await store.accept(new_job(body=bytes([i]))) for i in range(3)]
    assert ids == [1, 2, 3]
    job = await store.get(2, None)
    # every field as given, in state accepted, at ArangoDB under no id, no attempt yet
    assert job == new_job(body=b"\x01").accepted(2)
    assert (job.state, job.upstream_id, job.attempts) == (JobState.ACCEPTED, None, 0)
    assert store.unfinished == 3


async def test_text_that_is_not_utf8_round_trips_and_does_not_poison_the_batch(
    store: JobStore, data: Path
) -> None:
    # aiohttp decodes undecodable request bytes to lone surrogates (surrogateescape).
    odd = new_job(
        user="b\udcffb",
        target="/_api/x\udc80?q=\u00e9",
        auth="Basic \udcfe",
        headers=(("X-Raw", "\udce9t\u00e9"),),
    )
    plain = new_job(user="d\u00e9sir\u00e9e")
    odd_id, plain_id = await asyncio.gather(store.accept(odd), store.accept(plain))
    job = await store.get(odd_id, "b\udcffb")
    assert job is not None
    assert (job.user, job.target, job.auth, job.headers) == (
        odd.user,
        odd.target,
        odd.auth,
        odd.headers,
    )
    assert await store.list_ids(done=False, viewer="b\udcffb", limit=10) == [odd_id]
    assert await store.list_ids(done=False, viewer="d\u00e9sir\u00e9e", limit=10) == [plain_id]
    assert await store.mark_submitted(odd_id, "up\udcff") is Mark.SUBMITTED
    [submitted] = await store.submitted()
    assert submitted.upstream_id == "up\udcff"
    # the id read back matches the stored one (requeue and cancel compare them)
    assert await store.cancel_submitted(odd_id, submitted.upstream_id, cancelled=False)
    assert await store.requeue(odd_id, submitted.upstream_id)
    # Valid UTF-8 stays plain TEXT in the file.
    assert raw_rows(data, "SELECT typeof(user), user FROM jobs WHERE id = ?", plain_id) == [
        ("text", "d\u00e9sir\u00e9e")
    ]


async def test_next_accepted_orders_limits_and_excludes(store: JobStore) -> None:
    ids = [await store.accept(new_job(mode=mode)) for mode in [*JobMode, *JobMode]]
    assert [j.id for j in await store.next_accepted(10)] == ids
    assert [j.id for j in await store.next_accepted(2)] == ids[:2]
    assert [j.id for j in await store.next_accepted(2, {ids[0], ids[2]})] == [ids[1], ids[3]]
    assert await store.next_accepted(0) == []
    assert len(await store.next_accepted(2**64, [2**64])) == 4
    assert await store.next_accepted(-1) == []
    # fire-and-forget jobs run too
    assert (await store.next_accepted(1, [ids[0]]))[0].mode is JobMode.FORGET
    assert await store.mark_submitted(ids[0], "u1") is Mark.SUBMITTED
    assert [j.id for j in await store.next_accepted(10)] == ids[1:]


async def test_mark_submitted_and_requeue(store: JobStore) -> None:
    job_id = await store.accept(new_job())
    assert await store.submitted() == []
    assert not await store.requeue(job_id, "700123")  # not submitted yet
    assert await store.mark_submitted(job_id, "700123") is Mark.SUBMITTED
    assert await store.mark_submitted(job_id, "700124") is Mark.GONE  # only from accepted
    [job] = await store.submitted()
    expected = new_job().accepted(job_id)
    # (all of it but the body: a harvester needs none, and they can be large)
    assert job == replace(expected, state=JobState.SUBMITTED, upstream_id="700123", body=b"")
    assert await store.state(job_id, None) is JobState.SUBMITTED
    assert not await store.requeue(job_id, "700124")  # not the copy at ArangoDB
    assert await store.requeue(job_id, "700123")
    assert not await store.requeue(job_id, "700123")
    job2 = await store.get(job_id, None)
    assert job2 is not None
    assert (job2.state, job2.upstream_id, job2.attempts) == (JobState.ACCEPTED, None, 1)
    assert store.unfinished == 1
    [again] = await store.next_accepted(10)  # sent again, with its body
    assert again == replace(expected, attempts=1)


CANCELED = StoredResponse(status=410, headers=(), body=b'{"errorNum":21}')


async def test_cancel_of_a_job_not_handed_out_is_its_result_at_once(store: JobStore) -> None:
    job_id = await store.accept(new_job())
    assert await store.cancel_accepted(job_id, CANCELED)
    assert await store.next_accepted(10) == []
    assert await store.take_result(job_id, None) == CANCELED
    assert not await store.cancel_accepted(job_id, CANCELED)  # not accepted any more


async def test_a_job_whose_cancel_is_being_written_is_not_handed_out(store: JobStore) -> None:
    job_id = await store.accept(new_job())
    cancelling = asyncio.create_task(store.cancel_accepted(job_id, CANCELED))
    await asyncio.sleep(0)  # its write is queued; the commit's callback has not run
    assert await store.next_accepted(10) == []
    assert await cancelling
    assert await store.take_result(job_id, None) == CANCELED


async def test_a_job_cancelled_while_being_sent_waits_for_arangodb_or_its_return(
    store: JobStore,
) -> None:
    """ArangoDB may have it (and run it): it stays pending, and the mark says to
    cancel it there. One given back surely unsent is cancelled here instead of handed
    out; one given back that may have gone out is sent again, its cancel dropped."""
    sent, returned = await store.accept(new_job()), await store.accept(new_job())
    maybe = await store.accept(new_job())
    assert [job.id for job in await store.next_accepted(10)] == [sent, returned, maybe]
    for job_id in (sent, returned, maybe):
        assert await store.cancel_accepted(job_id, CANCELED)
        assert await store.state(job_id, None) is JobState.ACCEPTED
    assert await store.mark_submitted(sent, "7") is Mark.CANCEL
    assert await store.state(sent, None) is JobState.SUBMITTED
    assert not await store.cancel_accepted(sent, CANCELED)  # the facade asks ArangoDB
    # `returned` came back refused (503): not sent again; `maybe` came back from a
    # worker process that died: it may have run, so it is sent again, not cancelled
    assert [job.id for job in await store.next_accepted(10, unsent=[returned])] == [maybe]
    assert await store.take_result(returned, None) == CANCELED
    assert await store.mark_submitted(maybe, "8") is Mark.SUBMITTED
    # a cancel that came too late for a job done at once leaves its result alone
    late = await store.accept(new_job())
    await store.next_accepted(10)
    assert await store.cancel_accepted(late, CANCELED)
    assert await store.finish(late, RESULT, from_states=(JobState.ACCEPTED,))
    assert await store.take_result(late, None) == RESULT


@pytest.mark.parametrize("submit", [False, True])
async def test_finish_stores_the_result_and_wipes_the_request(
    store: JobStore, data: Path, submit: bool
) -> None:
    job_id = await store.accept(new_job())
    if submit:
        assert await store.mark_submitted(job_id, "9") is Mark.SUBMITTED
    before = time.time()
    assert await store.finish(job_id, RESULT)
    assert store.unfinished == 0
    assert await store.state(job_id, "alice") is JobState.DONE
    assert await store.get(job_id, "alice") is None  # get() is for unfinished jobs
    [(auth, headers, body, finished)] = raw_rows(
        data, "SELECT auth, headers, body, finished FROM jobs WHERE id = ?", job_id
    )
    assert (auth, headers, body) == (None, None, None)
    assert before <= finished <= time.time()
    assert not await store.finish(job_id, RESULT)  # already done
    assert store.unfinished == 0
    assert await store.take_result(job_id, "alice") == RESULT


async def test_a_result_larger_than_sqlite_keeps_in_a_row_is_refused_before_its_write(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite refuses a value over 10**9 bytes, and with it the whole batch its write is
    in, at every try: such a result is ResultTooLarge (its job gets an error result
    instead: proxy.recording) whatever the store's size limit. (The bound made small
    here: a real one takes a GiB of memory.)"""
    monkeypatch.setattr(core, "RESULT_MOST", 1000)
    job_id = await store.accept(new_job())
    headers_size = len(rows.headers_param(RESULT.headers))
    with pytest.raises(ResultTooLarge, match="larger than SQLite keeps in a row"):
        await store.finish(job_id, replace(RESULT, body=b"x" * (1001 - headers_size)))
    assert await store.state(job_id, None) is JobState.ACCEPTED
    assert await store.finish(job_id, replace(RESULT, body=b"x" * (1000 - headers_size)))


async def test_finish_only_from_the_given_states(store: JobStore) -> None:
    job_id = await store.accept(new_job())
    assert await store.mark_submitted(job_id, "9") is Mark.SUBMITTED
    assert not await store.finish(job_id, RESULT, from_states=(JobState.ACCEPTED,))
    assert not await store.finish(job_id, RESULT, from_states=())
    with pytest.raises(ValueError, match="DONE"):
        await store.finish(job_id, RESULT, from_states=(JobState.DONE,))
    assert await store.state(job_id, None) is JobState.SUBMITTED
    assert store.unfinished == 1
    assert await store.finish(job_id, RESULT, from_states=(JobState.SUBMITTED,))
    assert store.unfinished == 0


async def test_fire_and_forget_jobs_are_invisible_and_vanish_when_finished(
    store: JobStore, data: Path
) -> None:
    job_id = await store.accept(new_job(mode=JobMode.FORGET))
    assert store.unfinished == 1
    for viewer in (None, "alice"):
        assert await store.state(job_id, viewer) is None
        assert await store.get(job_id, viewer) is None
        assert await store.take_result(job_id, viewer) is None
        assert await store.list_ids(done=False, viewer=viewer, limit=10) == []
        assert not await store.delete(job_id, viewer)
    assert await store.delete_all(None) == 0
    assert await store.finish(job_id, RESULT)
    assert store.unfinished == 0
    assert raw_rows(data, "SELECT count(*) FROM jobs") == [(0,)]


async def test_visibility_by_viewer(store: JobStore) -> None:
    alice = await store.accept(new_job(user="alice"))
    bob = await store.accept(new_job(user="bob"))
    assert await store.finish(bob, RESULT)
    assert await store.state(alice, "alice") is JobState.ACCEPTED
    assert await store.state(alice, "bob") is None
    assert await store.state(alice, "") is None  # the empty user is a user, not a superuser
    assert await store.get(alice, "bob") is None
    assert await store.take_result(bob, "alice") is None
    assert not await store.delete(bob, "alice")
    assert await store.delete_all("alice") == 1
    assert await store.delete_expired("alice", math.inf) == 0
    assert await store.list_ids(done=True, viewer="alice", limit=10) == []
    assert await store.list_ids(done=True, viewer=None, limit=10) == [bob]
    assert await store.take_result(bob, None) == RESULT  # the superuser sees everyone's


async def test_take_result_of_unfinished_done_and_missing_jobs(store: JobStore) -> None:
    job_id = await store.accept(new_job())
    assert await store.take_result(job_id, "alice") is JobState.ACCEPTED
    assert await store.mark_submitted(job_id, "1") is Mark.SUBMITTED
    assert await store.take_result(job_id, "alice") is JobState.SUBMITTED
    assert await store.finish(job_id, RESULT)
    assert await store.take_result(job_id, "alice") == RESULT
    assert await store.take_result(job_id, "alice") is None
    assert await store.state(job_id, None) is None
    assert await store.take_result(12345, None) is None


async def test_take_result_hands_out_a_result_exactly_once(store: JobStore) -> None:
    job_ids = [await store.accept(new_job()) for _ in range(5)]
    for job_id in job_ids:
        assert await store.finish(job_id, replace(RESULT, body=str(job_id).encode()))
    outcomes = await asyncio.gather(
        *(
            store.take_result(job_id, viewer)
            for _ in range(5)
            for job_id in job_ids
            for viewer in ("alice", None)
        )
    )
    got = [o for o in outcomes if isinstance(o, StoredResponse)]
    assert sorted(int(o.body) for o in got) == job_ids
    assert outcomes.count(None) == len(outcomes) - len(job_ids)


async def test_list_ids_done_and_pending(store: JobStore) -> None:
    ids = [await store.accept(new_job(user=user)) for user in ("alice", "bob") * 3]
    for job_id in ids[:4]:
        assert await store.finish(job_id, RESULT)
    assert await store.mark_submitted(ids[4], "1") is Mark.SUBMITTED
    assert await store.list_ids(done=True, viewer=None, limit=100) == ids[:4]
    assert await store.list_ids(done=True, viewer=None, limit=3) == ids[:3]
    assert await store.list_ids(done=True, viewer="bob", limit=100) == [ids[1], ids[3]]
    assert await store.list_ids(done=False, viewer=None, limit=100) == ids[4:]
    assert await store.list_ids(done=False, viewer="alice", limit=100) == [ids[4]]
    assert await store.list_ids(done=False, viewer=None, limit=0) == []
    assert await store.list_ids(done=False, viewer=None, limit=2**64) == ids[4:]
    assert await store.list_ids(done=False, viewer="carol", limit=100) == []


async def test_delete_removes_done_jobs_and_forgets_unfinished_ones(
    store: JobStore, data: Path
) -> None:
    done, pending = await store.accept(new_job()), await store.accept(new_job())
    assert await store.finish(done, RESULT)
    assert await store.delete(done, "alice")
    assert not await store.delete(done, "alice")
    assert raw_rows(data, "SELECT count(*) FROM jobs WHERE id = ?", done) == [(0,)]

    assert await store.delete(pending, None)
    assert await store.state(pending, None) is None
    assert not await store.delete(pending, None)
    assert store.unfinished == 1  # forgotten, but it still runs
    [job] = await store.next_accepted(10)
    assert (job.id, job.mode) == (pending, JobMode.FORGET)
    assert await store.mark_submitted(pending, "5") is Mark.SUBMITTED
    assert await store.finish(pending, RESULT)
    assert store.unfinished == 0
    assert raw_rows(data, "SELECT count(*) FROM jobs") == [(0,)]


async def test_delete_all_is_scoped_to_the_viewer(store: JobStore) -> None:
    ids = [await store.accept(new_job(user=user)) for user in ("alice", "bob", "alice", "bob")]
    assert await store.finish(ids[0], RESULT)
    assert await store.finish(ids[1], RESULT)
    assert await store.delete_all("alice") == 2
    assert await store.list_ids(done=True, viewer=None, limit=10) == [ids[1]]
    assert await store.list_ids(done=False, viewer=None, limit=10) == [ids[3]]
    assert store.unfinished == 2
    assert await store.delete_all(None) == 2
    assert await store.list_ids(done=False, viewer=None, limit=10) == []
    assert await store.delete_all(None) == 0
    assert len(await store.next_accepted(10)) == 2  # both forgotten jobs still run


async def test_delete_expired_uses_created_for_pending_and_finished_for_done(
    store: JobStore,
) -> None:
    old_pending = await store.accept(new_job(created=100.0))
    new_pending = await store.accept(new_job(created=300.0))
    old_but_just_done = await store.accept(new_job(created=100.0))
    assert await store.finish(old_but_just_done, RESULT)
    assert await store.delete_expired(None, math.nan) == 0  # ArangoDB: non-numeric stamp
    assert await store.delete_expired(None, 200.0) == 1
    assert await store.state(old_pending, None) is None
    assert await store.state(new_pending, None) is JobState.ACCEPTED
    assert await store.state(old_but_just_done, None) is JobState.DONE
    assert await store.delete_expired("bob", time.time() + 60) == 0
    assert await store.delete_expired("bob", 2**64) == 0  # ArangoDB's stamp is any double
    assert await store.delete_expired("alice", time.time() + 60) == 2
    assert await store.list_ids(done=True, viewer=None, limit=10) == []
    assert await store.list_ids(done=False, viewer=None, limit=10) == []
    assert store.unfinished == 2  # forgotten pending jobs still run


FOUND = StoredResponse(200, (("Content-Type", "application/json"),), b'{"result":true}')
MISSING = StoredResponse(404, (("Content-Type", "application/json"),), b'{"error":true}')


async def figures_after_reopen(store: JobStore, data: Path) -> tuple[int, int]:
    """The store's counts in memory, after checking them against a store opened anew."""
    await store.flush()  # (fetched results' deletes)
    counted = (store.unfinished, store.result_bytes)
    await store.close()
    reopened = await JobStore.open(data)
    try:
        assert (reopened.unfinished, reopened.result_bytes) == counted
    finally:
        await reopened.close()
    return counted


async def test_a_delete_run_as_a_job_is_that_jobs_answer_in_the_same_write(data: Path) -> None:
    """DELETE /_api/job/{id} sent as an async job (`Answering`): the delete and the job's
    answer commit together (a crash between two writes would run the job again, and
    then find nothing), found or not; the counts in memory stay exact."""
    store = await JobStore.open(data)
    done = await store.accept(new_job())
    assert await store.finish(done, RESULT)
    pending = await store.accept(new_job())
    deleting = [await store.accept(new_job(method="DELETE")) for _ in range(4)]
    commits = store.commits
    assert await store.delete(done, "alice", Answering(deleting[0], FOUND, MISSING))
    assert store.commits == commits + 1
    assert await store.delete(pending, "alice", Answering(deleting[1], FOUND, MISSING))
    assert not await store.delete(done, "alice", Answering(deleting[2], FOUND, MISSING))
    assert not await store.delete(pending, "bob", Answering(deleting[3], FOUND, MISSING))
    assert [await store.take_result(job, "alice") for job in deleting] == [
        FOUND,
        FOUND,
        MISSING,
        MISSING,
    ]
    assert await store.state(done, None) is None
    assert await store.state(pending, None) is None  # forgotten: it runs on
    assert await figures_after_reopen(store, data) == (1, 0)


async def test_a_delete_run_as_a_job_of_a_result_being_fetched_is_answered_not_found(
    store: JobStore,
) -> None:
    done = await store.accept(new_job())
    assert await store.finish(done, RESULT)
    deleting = await store.accept(new_job(method="DELETE"))
    assert await store.take_result(done, "alice") == RESULT  # (its row's delete is lazy)
    assert not await store.delete(done, "alice", Answering(deleting, FOUND, MISSING))
    assert await store.take_result(deleting, "alice") == MISSING


@pytest.mark.parametrize("what", ["one", "all", "expired"])
async def test_a_delete_run_as_a_job_that_deletes_that_job_drops_its_answer(
    data: Path, what: str
) -> None:
    """As in ArangoDB: the job is forgotten by its own delete, and its answer with it."""
    store = await JobStore.open(data)
    other = await store.accept(new_job())
    assert await store.finish(other, RESULT)
    kept = store.result_bytes
    deleting = await store.accept(new_job(method="DELETE"))
    answering = Answering(deleting, FOUND, MISSING)
    if what == "one":
        assert await store.delete(deleting, "alice", answering)
    elif what == "all":
        assert await store.delete_all("alice", answering) == 2
    else:
        assert await store.delete_expired("alice", time.time() + 60, answering) == 2
    assert await store.take_result(deleting, "alice") is None
    assert raw_rows(data, "SELECT id FROM jobs") == ([(other,)] if what == "one" else [])
    assert await figures_after_reopen(store, data) == (0, kept if what == "one" else 0)


async def test_deletes_of_many_run_as_a_job_are_its_answer_in_the_same_write(data: Path) -> None:
    store = await JobStore.open(data)
    mine, bobs = await store.accept(new_job()), await store.accept(new_job(user="bob"))
    deleting = await store.accept(new_job(method="DELETE", created=time.time() + 30))
    commits = store.commits
    assert await store.delete_all("alice", Answering(deleting, FOUND, MISSING)) == 2
    assert store.commits == commits + 1  # (the job itself, too: it was pending)
    assert await store.take_result(deleting, "alice") is None
    assert await store.state(bobs, None) is JobState.ACCEPTED
    expiring = await store.accept(new_job(method="DELETE", created=time.time() + 30))
    assert await store.delete_expired(None, time.time(), Answering(expiring, FOUND, MISSING)) == 1
    assert await store.take_result(expiring, None) == FOUND  # (created after the stamp)
    assert await store.state(bobs, None) is None
    assert await store.state(mine, None) is None
    assert await figures_after_reopen(store, data) == (2, 0)  # (the forgotten two run on)


@pytest.mark.parametrize("job_id", [0, -1, 2**63, 2**64 - 1, 2**63 - 1])
async def test_ids_outside_the_table_range_are_not_found(store: JobStore, job_id: int) -> None:
    await store.accept(new_job())
    assert await store.state(job_id, None) is None
    assert await store.get(job_id, None) is None
    assert await store.take_result(job_id, None) is None
    assert not await store.delete(job_id, None)
    assert await store.mark_submitted(job_id, "1") is Mark.GONE
    assert not await store.requeue(job_id, "1")
    assert not await store.cancel_submitted(job_id, "1")
    assert not await store.finish(job_id, RESULT)
    assert store.unfinished == 1


async def test_ids_are_never_reused_after_reopen_even_when_the_newest_rows_are_gone(
    data: Path,
) -> None:
    store = await JobStore.open(data)
    ids = [await store.accept(new_job()) for _ in range(3)]
    assert await store.finish(ids[2], RESULT)
    assert await store.take_result(ids[2], None) == RESULT
    await store.close()

    store = await JobStore.open(data)
    assert await store.accept(new_job()) == 4
    assert await store.delete_all(None) == 3
    for job_id in range(1, 5):
        await store.finish(job_id, RESULT)
    assert raw_rows(data, "SELECT count(*) FROM jobs") == [(0,)]
    await store.close()

    store = await JobStore.open(data)
    assert await store.accept(new_job(mode=JobMode.FORGET)) == 5
    await store.close()


async def test_a_cancel_sent_to_arangodb_is_kept_and_stops_any_rerun(data: Path) -> None:
    """A job its owner cancelled at ArangoDB, which ArangoDB then loses, must not be
    sent again: the cancel is in the file (a restart keeps it) and requeue refuses
    the job. Only the job at ArangoDB under the given id can be cancelled so."""
    store = await JobStore.open(data)
    cancelled, caught, other = [await store.accept(new_job()) for _ in range(3)]
    assert not await store.cancel_submitted(cancelled, "5")  # accepted: not at ArangoDB
    assert await store.mark_submitted(cancelled, "5") is Mark.SUBMITTED
    assert not await store.cancel_submitted(cancelled, "6")  # another copy's id
    assert await store.cancel_submitted(cancelled, "5")
    # one cancelled while being sent: its mark records the cancel too
    assert [job.id for job in await store.next_accepted(10)] == [caught, other]
    assert await store.cancel_accepted(caught, CANCELED)
    assert await store.mark_submitted(caught, "7") is Mark.CANCEL
    assert await store.mark_submitted(other, "8") is Mark.SUBMITTED
    await store.close()

    store = await JobStore.open(data)
    assert not await store.requeue(cancelled, "5")
    assert not await store.requeue(caught, "7")
    assert await store.requeue(other, "8")
    assert {job.id for job in await store.submitted()} == {cancelled, caught}
    assert await store.finish(cancelled, RESULT, from_states=(JobState.SUBMITTED,))
    assert not await store.cancel_submitted(cancelled, "5")  # done
    await store.close()


async def test_a_lost_copy_is_requeued_or_finished_only_while_it_is_the_one_sent(
    store: JobStore,
) -> None:
    """ArangoDB lost the copy sent as "1": once the job is sent again (as "2"), a late
    requeue or lost-result for "1" leaves it alone; a cancel recorded for "2" and
    taken back (it never reached ArangoDB) lets "2" be requeued again."""
    job_id = await store.accept(new_job())
    assert await store.mark_submitted(job_id, "1") is Mark.SUBMITTED
    assert await store.requeue(job_id, "1")
    assert await store.mark_submitted(job_id, "2") is Mark.SUBMITTED
    assert not await store.requeue(job_id, "1")
    assert not await store.finish(job_id, RESULT, upstream_id="1")
    assert not await store.cancel_submitted(job_id, "1")
    assert await store.cancel_submitted(job_id, "2")
    assert await store.cancel_submitted(job_id, "2", cancelled=False)
    assert await store.requeue(job_id, "2")
    assert await store.mark_submitted(job_id, "3") is Mark.SUBMITTED
    assert await store.finish(job_id, RESULT, upstream_id="3")
    assert await store.take_result(job_id, None) == RESULT


async def marked_while_cancelled(store: JobStore, upstream_id: str) -> Mark:
    """The mark of a job just sent, with a cancel that comes while it commits."""
    job_id = await store.accept(new_job())
    [job] = await store.next_accepted(10)
    marking = asyncio.create_task(store.mark_submitted(job.id, upstream_id))
    await asyncio.sleep(0)  # the mark's write is queued
    assert await store.cancel_accepted(job_id, CANCELED)
    return await marking


async def test_a_cancel_that_comes_while_the_mark_commits_is_recorded_after_it(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded right after the mark (requeue then refuses the job). If that write
    fails, the job is still submitted and the cancel still goes to ArangoDB
    (Mark.CANCEL), not taken for gone."""
    assert await marked_while_cancelled(store, "8") is Mark.CANCEL
    assert not await store.requeue(1, "8")

    async def failing(*_: Any) -> bool:
        raise StoreError("disk I/O error")

    monkeypatch.setattr(store, "cancel_submitted", failing)
    assert await marked_while_cancelled(store, "9") is Mark.CANCEL
    assert await store.state(2, None) is JobState.SUBMITTED
    assert await store.requeue(2, "9")  # (not recorded)
    # a cancel that was waiting before the mark is written with it, in one commit
    waited = await store.accept(new_job())
    await store.next_accepted(10)
    assert await store.cancel_accepted(waited, CANCELED)
    assert await store.mark_submitted(waited, "10") is Mark.CANCEL
    assert not await store.requeue(waited, "10")


async def test_unfinished_is_exact_and_survives_reopen(data: Path) -> None:
    store = await JobStore.open(data)
    ids = [await store.accept(new_job()) for _ in range(4)]
    assert await store.mark_submitted(ids[0], "1") is Mark.SUBMITTED
    assert await store.finish(ids[1], RESULT)
    assert await store.delete(ids[2], None)  # forgotten: still unfinished
    assert await store.delete(ids[1], None)  # a done row: not counted anyway
    assert store.unfinished == 3
    await store.close()
    store = await JobStore.open(data)
    assert store.unfinished == 3
    await store.close()


async def test_capacity_counts_unfinished_and_queued_accepts(data: Path) -> None:
    store = await JobStore.open(data, capacity=3)
    try:
        outcomes = await asyncio.gather(
            *(store.accept(new_job()) for _ in range(5)), return_exceptions=True
        )
        assert outcomes[:3] == [1, 2, 3]
        assert all(isinstance(o, CapacityExceeded) for o in outcomes[3:])
        assert await store.delete(1, None)  # forgetting does not free a slot: it still runs
        with pytest.raises(CapacityExceeded, match="3 unfinished"):
            await store.accept(new_job())
        assert await store.finish(1, RESULT)
        assert await store.accept(new_job()) == 4  # refused accepts took no id
    finally:
        await store.close()


async def test_concurrent_accepts_share_commits(store: JobStore) -> None:
    before = store.commits
    ids = await asyncio.gather(*(store.accept(new_job(body=bytes(i))) for i in range(200)))
    assert ids == list(range(1, 201))  # arrival order
    assert store.commits - before < 20
    assert store.unfinished == 200
    assert [j.id for j in await store.next_accepted(1000)] == ids


async def test_a_batch_of_accepts_is_one_insert_per_64_rows_each_row_exact(data: Path) -> None:
    """Accepts that share a batch are one multi-row INSERT per 64 jobs, not a statement
    step per job (storage.batch: each step lets the event loop take the interpreter
    lock); and each job's fields land in its own row."""
    store = await JobStore.open(data)
    traced: list[str] = []
    try:
        await store._writer.call(lambda conn: conn.set_trace_callback(traced.append))
        release = threading.Event()
        held = store._writer.call(lambda _conn: release.wait())  # one batch for all below
        jobs = [
            new_job(
                mode=JobMode.STORE if i % 3 else JobMode.FORGET,
                user=f"user{i}",
                database=f"db{i % 7}",
                method=("GET", "POST", "PUT")[i % 3],
                target=f"/_api/document/c/{i}?x={i}",
                headers=(("X-N", str(i)),) * (i % 4),
                auth=None if i % 5 == 0 else f"Basic {i}",
                body=bytes([i % 256]) * i,
                created=1_700_000_000.0 + i,
            )
            for i in range(150)
        ]
        accepts = [asyncio.ensure_future(store.accept(job)) for job in jobs]
        await asyncio.sleep(0.01)
        release.set()
        await held
        assert await asyncio.gather(*accepts) == list(range(1, 151))
        inserts = [sql for sql in traced if sql.startswith("INSERT INTO jobs")]
        assert len(inserts) == 3  # 64 + 64 + 22 rows
    finally:
        await store.close()
    store = await JobStore.open(data)  # nothing in memory: every job read from the file
    try:
        stored = await store.next_accepted(1000)
    finally:
        await store.close()
    assert [job.id for job in stored] == list(range(1, 151))
    assert stored == [job.accepted(job_id) for job_id, job in enumerate(jobs, 1)]


async def test_a_values_group_is_in_its_insert_once_with_positional_parameters(
    store: JobStore,
) -> None:
    assert Statement("INSERT INTO t (a) VALUES (?)", (1,), "(?)").values == "(?)"
    with pytest.raises(ValueError, match="values group"):
        Statement("INSERT INTO t (a) VALUES (?, ?)", (1, 2), "(?)")
    with pytest.raises(ValueError, match="positional"):
        Statement("INSERT INTO t (a) VALUES (:a)", {"a": 1}, "(:a)")
    # its writes share statements, so none of them can have a count or rows of its own
    insert = Statement("INSERT INTO t (a) VALUES (?)", (1,), "(?)")
    for want in (Want.ROWCOUNT, Want.ROWS):
        with pytest.raises(ValueError, match="of its own"):
            store._writer.enqueue(insert, want=want)
    with pytest.raises(ValueError, match="of its own"):
        store._writer.enqueue(insert, insert)


async def test_a_batch_of_mixed_writes_commits_once_and_in_order(store: JobStore) -> None:
    first = await store.accept(new_job())
    before = store.commits
    outcomes = await asyncio.gather(
        store.accept(new_job()),
        store.accept(new_job()),
        store.mark_submitted(first, "7"),
        store.finish(first, RESULT),
        store.accept(new_job()),
        store.delete(first, None),
        store.accept(new_job()),
    )
    assert outcomes == [2, 3, Mark.SUBMITTED, True, 4, True, 5]
    assert store.commits - before == 1
    assert store.unfinished == 4


async def _taken(store: JobStore) -> int:
    """A done job whose result was just handed out: its delete is a lazy write."""
    job_id = await store.accept(new_job())
    assert await store.finish(job_id, RESULT)
    assert await store.take_result(job_id, None) == RESULT
    return job_id


async def test_a_fetched_results_delete_joins_the_next_commit(
    store: JobStore, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete of a result handed out starts no commit (no fsync) of its own: it
    commits with the next write, and the job is gone for readers meanwhile."""
    monkeypatch.setattr(writer, "LAZY_DELAY", 60.0)
    taken = await _taken(store)
    before = store.commits
    await asyncio.sleep(0.05)
    assert store.commits == before
    assert raw_rows(data, "SELECT id FROM jobs WHERE id = ?", taken) == [(taken,)]
    assert await store.take_result(taken, None) is None
    assert await store.state(taken, None) is None
    assert taken not in await store.list_ids(done=True, viewer=None, limit=10)
    assert not await store.delete(taken, None)  # (as ArangoDB: 404 once fetched)
    await store.accept(new_job())
    await asyncio.sleep(0)  # (the delete's own callback runs after the accept's future)
    assert store.commits == before + 1
    assert raw_rows(data, "SELECT id FROM jobs WHERE id = ?", taken) == []
    assert store.result_bytes == 0
    assert taken not in store._taken


async def test_writes_after_a_lazy_delete_commit_after_it(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes commit in the order they came: a delete of every done job after a fetch
    finds the fetched one gone already (and does not count it)."""
    monkeypatch.setattr(writer, "LAZY_DELAY", 60.0)
    await _taken(store)
    assert await store.delete_all(None) == 0
    assert store.result_bytes == 0


async def test_a_lazy_write_does_not_pass_a_write_queued_before_a_call(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that ends at a call takes no lazy write: one queued after the write
    behind the call commits after that write."""
    monkeypatch.setattr(writer, "LAZY_DELAY", 60.0)
    queue = store._writer
    await queue.execute_fetchall("CREATE TABLE scratch (id INTEGER PRIMARY KEY, key TEXT)")
    insert = "INSERT INTO scratch (key) VALUES (?)"
    release = threading.Event()
    held = queue.call(lambda _conn: release.wait())  # the thread is busy meanwhile
    first = queue.enqueue(Statement(insert, ("first",)))
    between = queue.call(lambda _conn: None)
    behind = queue.enqueue(Statement(insert, ("behind the call",)))
    lazy = queue.enqueue(Statement(insert, ("lazy",)), lazy=True)
    release.set()
    await asyncio.wait_for(asyncio.gather(held, first, between, behind, lazy), 5)
    rows = await queue.execute_fetchall("SELECT key FROM scratch ORDER BY id")
    assert [key for (key,) in rows] == ["first", "behind the call", "lazy"]


async def test_a_fetched_results_delete_commits_alone_within_the_lazy_delay(
    store: JobStore, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "LAZY_DELAY", 0.2)
    taken = await _taken(store)
    await asyncio.sleep(0.05)
    assert raw_rows(data, "SELECT id FROM jobs WHERE id = ?", taken) == [(taken,)]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not raw_rows(data, "SELECT id FROM jobs WHERE id = ?", taken):
            break
    assert raw_rows(data, "SELECT id FROM jobs WHERE id = ?", taken) == []
    assert taken not in store._taken


async def test_flush_and_close_commit_the_lazy_writes(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "LAZY_DELAY", 60.0)
    monkeypatch.setattr(writer, "MAX_BATCH", 2)  # more lazy writes than one batch takes
    store = await JobStore.open(data)
    try:
        done = [await store.accept(new_job()) for _ in range(3)]
        for job_id in done:
            assert await store.finish(job_id, RESULT)
        for job_id in done:  # three lazy deletes waiting, none of them in a batch yet
            assert await store.take_result(job_id, None) == RESULT
        await store.flush()
        assert raw_rows(data, "SELECT id FROM jobs WHERE state = 'done'") == []
        assert store._taken == set()
        closed = await _taken(store)
    finally:
        await store.close()
    assert raw_rows(data, "SELECT id FROM jobs WHERE id = ?", closed) == []


async def test_close_commits_queued_writes_and_then_refuses(data: Path) -> None:
    store = await JobStore.open(data)
    accepts = [asyncio.create_task(store.accept(new_job())) for _ in range(10)]
    await asyncio.sleep(0)  # let them queue
    await store.close()
    assert [t.result() for t in accepts] == list(range(1, 11))
    with pytest.raises(StoreError, match="closed"):
        await store.accept(new_job())
    with pytest.raises(StoreError, match="closed"):
        await store.state(1, None)
    await store.close()  # twice is fine
    store = await JobStore.open(data)
    assert await store.list_ids(done=False, viewer=None, limit=100) == list(range(1, 11))
    await store.close()


@pytest.mark.parametrize(("synchronous", "level"), [("FULL", 2), ("normal", 1)])
async def test_pragmas(data: Path, synchronous: str, level: int) -> None:
    store = await JobStore.open(data, synchronous=synchronous)
    try:
        db = store._writer
        for pragma, value in [
            ("journal_mode", "wal"),
            ("synchronous", level),
            ("secure_delete", 1),
            ("busy_timeout", 5000),
            ("journal_size_limit", 64 * 1024 * 1024),
            ("temp_store", 2),  # MEMORY: the commands' rows and outcomes
            ("user_version", schema.LATEST),
        ]:
            assert list(await db.execute_fetchall(f"PRAGMA {pragma}")) == [(value,)]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [({"synchronous": "OFF"}, "synchronous"), ({"capacity": -1}, "capacity")],
)
async def test_bad_options(data: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await JobStore.open(data, **options)


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("Host", "x"), ("X-Empty", "")),
        (("X-Quote", '"\\\t\n'), ("X-Accent", "é"), ("X-Raw", "\udcff\udc80")),
    ],
)
def test_headers_are_stored_as_json_and_read_back(headers: tuple[tuple[str, str], ...]) -> None:
    stored = rows.headers_param(headers)
    assert stored == json.dumps(headers, separators=(",", ":"))
    assert stored.isascii()
    assert rows.headers_value(stored) == headers

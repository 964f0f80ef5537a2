"""Store faults as clients see them: a 503 in ArangoDB's shape, never a 202 for a
write that did not commit, and recovery without a restart once the fault goes.

The faults are real SQLite conditions on the proxy's own file: the size limit
(`storage.max_db_size`, SQLite's max_page_count, which fails like a full disk),
a lock held by another connection (busy), a size cap set on the running store's
connection (full while a result is being recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import create_app
from proxy.state import STORE
from storage import JobState
from tests.conftest import proxy_config
from tests.standin import StandIn
from tests.standin.client import Client, eventually

ServeApp = Callable[..., Awaitable[str]]


async def start(
    serve_proxy: ServeApp, upstream: str, data: Path, **sections: dict[str, Any]
) -> tuple[web.Application, str]:
    config = proxy_config(upstream, data, **sections)
    app = create_app(config)
    return app, await serve_proxy(app)


async def test_size_limit_refuses_with_503_and_recovers_when_jobs_move_on(
    standin: StandIn, serve_proxy: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await Client(http, standin.url).call("POST", "/_api/collection", {"name": "c"})
    limit = 256 * 1024
    _, url = await start(serve_proxy, standin.url, tmp_path / "d", storage={"max_db_size": limit})
    jobs = Client(http, url)
    standin.queue_full = True  # ArangoDB takes nothing: the jobs pile up in the proxy
    pad = "x" * 8000
    accepted: list[str] = []
    refused = None
    for n in range(100):
        answer = await jobs.call(
            "POST",
            "/_api/document/c",
            {"_key": f"k{n}", "pad": pad},
            headers={"x-arango-async": "store"},
        )
        if answer.status != 202:
            refused = answer
            break
        assert answer.async_id is not None
        accepted.append(answer.async_id)
    assert refused is not None, "the size limit never refused a job"
    assert refused.status == 503
    assert refused.json["errorNum"] == 21003
    assert refused.json["error"] is True
    assert "size limit" in refused.json["errorMessage"]
    assert 10 < len(accepted) < 32  # 8 KB each in 256 KB, less the reserve
    assert (tmp_path / "d" / "jobs.sqlite3").stat().st_size <= limit
    # ArangoDB takes work again: every accepted job runs and its result is kept
    # (the reserve is for that); a done job's request is wiped, which makes room,
    # and the proxy takes jobs again without a restart.
    standin.queue_full = False
    for job_id in accepted:
        assert (await jobs.result(job_id)).status == 202
    again = await jobs.submit("POST", "/_api/document/c", {"_key": "after", "pad": pad})
    assert (await jobs.result(again)).status == 202


async def test_a_burst_at_the_size_limit_gets_202_only_for_what_committed(
    standin: StandIn, serve_proxy: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Concurrent accepts count towards the limit as they queue (not only once
    committed); a batch that still overshoots SQLite's own limit fails as a whole,
    each of its jobs a 503. Those answered 202 all run, their results stored."""
    limit = 256 * 1024
    _, url = await start(serve_proxy, standin.url, tmp_path / "d", storage={"max_db_size": limit})
    jobs = Client(http, url)
    standin.queue_full = True
    too_big = {"query": "RETURN @x", "bindVars": {"x": "y" * 40_000}}
    answer = await jobs.call("POST", "/_api/cursor", too_big, headers={"x-arango-async": "store"})
    assert (answer.status, answer.json["errorNum"]) == (503, 21003)
    assert "too large for a job store limited to 262144 bytes" in answer.json["errorMessage"]
    body = {"query": "RETURN @x", "bindVars": {"x": "y" * 12_000}}
    first = await jobs.submit("POST", "/_api/cursor", body)  # one that surely fits
    answers = await asyncio.gather(
        *(
            jobs.call("POST", "/_api/cursor", body, headers={"x-arango-async": "store"})
            for _ in range(40)
        )
    )
    accepted = [first] + [a.async_id or "" for a in answers if a.status == 202]
    refused = [a for a in answers if a.status != 202]
    assert refused  # 40 x 12 KB cannot fit in what is left of 256 KB
    for answer in refused:
        assert answer.status == 503
        assert answer.json["error"] is True
        assert answer.json["errorNum"] in (503, 21003)
        assert answer.async_id is None
    # Exactly the jobs answered 202 exist: a refused one left nothing behind.
    pending = (await jobs.call("GET", "/_api/job/pending?count=100")).json
    assert sorted(pending, key=int) == sorted(accepted, key=int)
    standin.queue_full = False
    for job_id in accepted:
        assert (await jobs.result(job_id)).status == 201


async def test_a_result_that_can_never_fit_ends_its_job_with_an_error_that_says_so(
    standin: StandIn, serve_proxy: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """ArangoDB has handed the result over, and no one else has it: waiting for room
    that can never come would keep the job pending for ever (and fail every batch
    its write joins). A small request, a large answer: a large document's read."""
    direct = Client(http, standin.url)
    await direct.call("POST", "/_api/collection", {"name": "c"})
    await direct.call("POST", "/_api/document/c", {"_key": "big", "pad": "y" * 200_000})
    await direct.call("POST", "/_api/document/c", {"_key": "small"})
    limit = 256 * 1024
    _, url = await start(serve_proxy, standin.url, tmp_path / "d", storage={"max_db_size": limit})
    jobs = Client(http, url)
    too_big = await jobs.submit("GET", "/_api/document/c/big")
    fits = await jobs.submit("GET", "/_api/document/c/small")
    answer = await jobs.result(too_big)
    assert (answer.status, answer.json["errorNum"]) == (500, 4)
    assert "ArangoDB's answer (200) to this job was dropped" in answer.json["errorMessage"]
    assert "too large for a job store limited to 262144 bytes" in answer.json["errorMessage"]
    assert (await jobs.result(fits)).json["_key"] == "small"


def ids_in_file(folder: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(folder / "jobs.sqlite3")) as db:
        return [row[0] for row in db.execute("SELECT id FROM jobs ORDER BY id")]


async def test_a_locked_database_gives_503_to_writes_hands_out_results_then_recovers(
    standin: StandIn, serve_proxy: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    app, url = await start(serve_proxy, standin.url, tmp_path / "d")
    jobs = Client(http, url)
    done = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(done)
    await app[STORE]._writer.execute_fetchall("PRAGMA busy_timeout = 50")  # not 5 s in a test
    other = sqlite3.connect(tmp_path / "d" / "jobs.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        refused = await jobs.call("GET", "/_api/version", headers={"x-arango-async": "store"})
        assert (refused.status, refused.json["errorNum"]) == (503, 503)
        assert "database is locked" in refused.json["errorMessage"]
        delete = await jobs.call("DELETE", "/_api/job/all")
        assert (delete.status, delete.json["error"]) == (503, True)
        # Reads still work in WAL mode while the writer is locked out, and a result
        # is handed out: its delete is retried until it commits.
        assert (await jobs.call("GET", f"/_api/job/{done}")).status == 200
        fetch = await jobs.call("PUT", f"/_api/job/{done}")
        assert (fetch.status, fetch.async_id, fetch.json["server"]) == (200, done, "arango")
        assert (await jobs.call("GET", f"/_api/job/{done}")).status == 404  # gone for readers
        assert (await jobs.call("PUT", f"/_api/job/{done}")).status == 404
        assert ids_in_file(tmp_path / "d") == [int(done)]  # still in the file
        other.execute("ROLLBACK")
    finally:
        other.close()
    await eventually(lambda: ids_in_file(tmp_path / "d") == [])
    assert (await jobs.call("PUT", f"/_api/job/{done}")).status == 404
    assert (await jobs.result(await jobs.submit("GET", "/_api/version"))).status == 200


async def test_a_fetched_result_waits_for_room_instead_of_running_again(
    standin_factory: Callable[..., Awaitable[StandIn]],
    serve_proxy: ServeApp,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """ArangoDB hands a result over once: if the store is full then, it must keep it."""
    standin = await standin_factory(workers=1)
    direct = Client(http, standin.url)
    await direct.call("POST", "/_api/collection", {"name": "big"})
    await direct.call("POST", "/_api/document/big", {"_key": "b", "pad": "z" * 200_000})
    app, url = await start(serve_proxy, standin.url, tmp_path / "d")
    store = app[STORE]
    jobs = Client(http, url)
    blocker = await jobs.submit("POST", "/_api/cursor", {"query": "RETURN SLEEP(30)"})
    query = {"query": "FOR v IN big RETURN v"}
    reader = await jobs.submit("POST", "/_api/cursor", query)

    async def state(job_id: str) -> JobState | None:
        return await store.state(int(job_id), None)

    for _ in range(1000):  # both at the stand-in, the reader queued behind the sleeper
        if await state(reader) is JobState.SUBMITTED:
            break
        await asyncio.sleep(0.01)
    # The file may not grow any more: storing a 200 KB result must fail for now.
    db = store._writer
    [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
    await db.execute_fetchall(f"PRAGMA max_page_count = {pages}")
    assert (await jobs.call("PUT", f"/_api/job/{blocker}/cancel")).status == 200
    # The harvester fetched the result (the stand-in no longer holds the job)...
    await eventually(lambda: not standin.jobs.entries, seconds=20)
    await asyncio.sleep(0.3)  # ...and keeps failing to store it for a while
    assert await state(reader) is JobState.SUBMITTED
    await db.execute_fetchall("PRAGMA max_page_count = 1073741823")
    answer = await jobs.result(reader)
    assert answer.status == 201
    assert answer.json["result"][0]["pad"] == "z" * 200_000
    assert standin.executed[("POST", "/_api/cursor")] == 2  # blocker and reader, once each


async def test_a_damaged_database_under_a_running_proxy_gives_503_never_202(
    standin: StandIn, serve_proxy: ServeApp, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, url = await start(serve_proxy, standin.url, tmp_path / "d")
    jobs = Client(http, url)
    done = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(done)
    # Real damage from outside: the table is dropped under the running proxy.
    with sqlite3.connect(tmp_path / "d" / "jobs.sqlite3", isolation_level=None) as other:
        other.execute("DROP TABLE jobs")
    other.close()
    # (`done`'s result is held in memory too, and still served; any other id is a read)
    other_id = int(done) + 1
    for method, path, headers in (
        ("GET", f"/_api/job/{other_id}", {}),
        ("GET", "/_api/job/done", {}),
        ("PUT", f"/_api/job/{other_id}", {}),
        ("PUT", f"/_api/job/{done}/cancel", {}),
        ("POST", "/_api/version", {"x-arango-async": "store"}),
        ("POST", "/_api/version", {"x-arango-async": "true"}),
    ):
        answer = await jobs.call(method, path, headers=headers)
        assert answer.status == 503, (method, path, answer)
        assert answer.json["error"] is True
        assert answer.json["errorNum"] == 503
        assert "no such table" in answer.json["errorMessage"]
    # What does not need the store goes on: health and pass-through.
    assert (await jobs.call("GET", "/_proxy/health")).status == 200
    assert (await jobs.call("GET", "/_api/version")).status == 200

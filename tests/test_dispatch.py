"""Dispatcher and harvester against what ArangoDB can do to them.

Lost jobs and outages use the real stand-in. Replies that the stand-in never
gives (a 503 without ArangoDB's body, a 202 that arrives after the job was
cancelled, a harvest refused with 401) come from a scripted fake upstream,
the only way to produce them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import harvester, jobs_api
from proxy.app import create_app
from proxy.recording import record
from proxy.state import DISPATCHER, METRICS, STORE
from proxy.worker_process import WorkerProcess
from proxy.workers import Workers
from storage import JobState, JobStore, Mark, StoredResponse, StoreError
from storage.store import UNKNOWN
from tests.conftest import ProxyFactory, proxy_config
from tests.processes import free_port
from tests.standin import StandIn
from tests.standin.client import ROOT, Client, RawClient, eventually
from tests.test_store import new_job


async def slow_one_and_one_behind(
    jobs: Client, direct: Client, seconds: float = 0.5
) -> tuple[str, str]:
    """A query of `seconds` and a GET through the proxy, once both are pending at a
    stand-in with one worker (the GET waits behind the query)."""
    query = {"query": f"RETURN SLEEP({seconds})"}
    slow = await jobs.submit("POST", "/_api/cursor", body=query)
    quick = await jobs.submit("GET", "/_api/version")
    for _ in range(400):
        if len((await direct.call("GET", "/_api/job/pending")).json) == 2:
            return slow, quick
        await asyncio.sleep(0.005)
    pytest.fail("jobs never reached the stand-in")


async def test_lost_jobs_follow_the_policy(
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """One worker: a slow query runs, a GET waits behind it; the restart loses both."""
    results: dict[str, tuple[int, int]] = {}
    for policy in ("rerun", "rerun-safe", "fail"):
        standin = await standin_factory(workers=1)
        jobs = Client(http, await start_proxy(standin.url, jobs={"lost_job_policy": policy}))
        slow, quick = await slow_one_and_one_behind(jobs, Client(http, standin.url))
        await standin.restart()
        slow_result = await jobs.result(slow)
        quick_result = await jobs.result(quick)
        results[policy] = (slow_result.status, quick_result.status)
        if slow_result.status == 500:
            body = slow_result.json
            assert body["errorNum"] == 4
            assert "lost this job" in body["errorMessage"]
            assert f"lost_job_policy={policy}" in body["errorMessage"]
    assert results == {"rerun": (201, 200), "rerun-safe": (500, 200), "fail": (500, 500)}


async def test_a_job_cancelled_at_arangodb_and_lost_there_is_not_run_again(
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Under rerun: a job waits at ArangoDB behind a slow one, its owner cancels it,
    and ArangoDB restarts before the 410. The slow job runs again; the cancelled one
    never runs, and its result says why it was not run again."""
    standin = await standin_factory(workers=1)
    jobs = Client(http, await start_proxy(standin.url, jobs={"lost_job_policy": "rerun"}))
    direct = Client(http, standin.url)
    slow, cancelled = await slow_one_and_one_behind(jobs, direct)
    assert (await jobs.call("PUT", f"/_api/job/{cancelled}/cancel")).json == {"result": True}
    await standin.restart()
    assert (await jobs.result(slow)).status == 201
    answer = await jobs.result(cancelled)
    assert (answer.status, answer.json["errorNum"]) == (500, 4)
    assert "its owner had cancelled it" in answer.json["errorMessage"]
    assert standin.executed[("POST", "/_api/cursor")] == 2
    assert standin.executed[("GET", "/_api/version")] == 0
    assert (await direct.call("GET", "/_api/job/pending")).json == []


async def two_jobs_at_a_one_worker_arangodb(
    standin_factory: Callable[..., Awaitable[StandIn]],
    serve_proxy: Callable[..., Awaitable[str]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> tuple[StandIn, Client, str, str]:
    """A proxy (lost_job_policy rerun) whose ArangoDB runs one job at a time: a slow job
    running there and a quick one behind it, both recorded as at ArangoDB (until then
    the proxy takes a cancel itself). The stand-in, the client, the two ids."""
    standin = await standin_factory(workers=1)
    app = create_app(proxy_config(standin.url, tmp_path / "d", jobs={"lost_job_policy": "rerun"}))
    jobs = Client(http, await serve_proxy(app))
    slow, quick = await slow_one_and_one_behind(jobs, Client(http, standin.url), 1.5)
    for _ in range(400):
        if len(await app[STORE].submitted()) == 2:
            break
        await asyncio.sleep(0.005)
    else:
        pytest.fail("the jobs were never recorded as at ArangoDB")
    return standin, jobs, slow, quick


@pytest.mark.parametrize("earlier", [False, True], ids=["the only cancel", "after another"])
async def test_a_cancel_that_never_reached_arangodb_takes_back_only_itself(
    standin_factory: Callable[..., Awaitable[StandIn]],
    serve_proxy: Callable[..., Awaitable[str]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    earlier: bool,
) -> None:
    """The cancel finds ArangoDB refusing connections: its client gets the 503, and
    the job is as if it had not been asked; ArangoDB then restarts and loses both
    jobs: under rerun, both run again. But after an earlier cancel that reached
    ArangoDB (another client's, or a cancel sent as an async job run again after a
    crash), the refused one takes back nothing: the job is not run again."""
    standin, jobs, slow, quick = await two_jobs_at_a_one_worker_arangodb(
        standin_factory, serve_proxy, http, tmp_path
    )
    if earlier:
        assert (await jobs.call("PUT", f"/_api/job/{quick}/cancel")).json == {"result": True}
    await standin.go_offline()
    refused = await jobs.call("PUT", f"/_api/job/{quick}/cancel")
    await standin.go_online()
    assert (refused.status, refused.json.get("errorNum")) == (503, 503), refused.json
    await standin.restart()
    assert (await jobs.result(slow)).status == 201
    answer = await jobs.result(quick)
    if earlier:
        assert (answer.status, answer.json["errorNum"]) == (500, 4)
        assert "its owner had cancelled it" in answer.json["errorMessage"]
    else:
        assert answer.status == 200
    assert standin.executed[("GET", "/_api/version")] == (0 if earlier else 1)


@pytest.mark.parametrize("policy", ["rerun", "rerun-safe", "fail"])
async def test_a_job_whose_own_result_is_a_404_is_not_lost(
    policy: str,
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """An insert into a missing collection ends 404/1203: a result like any other,
    not ArangoDB's 404 for a job it does not know. (It waits behind a slow query
    at ArangoDB's one worker, so its first look finds it still running.)"""
    standin = await standin_factory(workers=1)
    jobs = Client(http, await start_proxy(standin.url, jobs={"lost_job_policy": policy}))
    await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.3)"})
    insert = await jobs.submit("POST", "/_api/document/nosuch", body={"a": 1})
    answer = await jobs.result(insert)
    assert (answer.status, answer.json["errorNum"]) == (404, 1203)
    await asyncio.sleep(0.3)  # a re-run would have reached ArangoDB by now
    assert standin.executed[("POST", "/_api/document/nosuch")] == 1


async def test_accepts_while_upstream_is_down_then_delivers(
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    port = free_port()
    first = StandIn()
    url = await first.start(port=port)
    jobs = Client(http, await start_proxy(url))
    assert (await jobs.call("GET", "/_api/job/done")).status == 200  # credentials verified
    await first.stop()
    job_ids = [await jobs.submit("GET", "/_api/version") for _ in range(5)]
    await asyncio.sleep(0.3)  # the dispatcher meets a closed port and backs off
    second = StandIn()
    await second.start(port=port)
    try:
        for job_id in job_ids:
            assert (await jobs.result(job_id)).json["server"] == "arango"
    finally:
        await second.stop()


class FakeArango:
    """An upstream that says what a test needs: scripted replies, recorded requests."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # without a /_db/{name} prefix
        self.seen_in_full: list[tuple[str, str]] = []
        self.submit_reply: Callable[[], Awaitable[web.Response]] = self._accepted
        self.fetch_reply: Callable[[str], Awaitable[web.Response]] = self._result
        self.list_reply: Callable[[str], web.Response] = self._list
        self.release = asyncio.Event()
        self.release.set()
        self._next = 900

    async def _accepted(self) -> web.Response:
        await self.release.wait()
        self._next += 1
        return web.Response(status=202, headers={"x-arango-async-id": str(self._next)})

    async def _result(self, upstream_id: str) -> web.Response:
        return web.json_response({"ok": upstream_id}, headers={"x-arango-async-id": upstream_id})

    def _list(self, which: str) -> web.Response:
        done = [str(i) for i in range(901, self._next + 1)]
        return web.json_response(done if which == "done" else [])

    async def handle(self, request: web.Request) -> web.Response:
        self.seen_in_full.append((request.method, request.path))
        path = re.sub(r"^/_db/[^/]+", "", request.path)  # any database: all alike here
        self.seen.append((request.method, path))
        if path.endswith("/_api/version") and "x-arango-async" not in request.headers:
            return web.json_response({"server": "arango", "version": "3.12.4"})
        if path in ("/_api/job/done", "/_api/job/pending"):
            return self.list_reply(path.rsplit("/", 1)[1])
        if request.method == "PUT" and path.startswith("/_api/job/"):
            return await self.fetch_reply(path.split("/")[3])
        return await self.submit_reply()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def lists(upstream: FakeArango) -> int:
    """The lists of jobs the proxy asked ArangoDB for, pending and done."""
    return sum(upstream.seen.count(("GET", f"/_api/job/{which}")) for which in ("pending", "done"))


@pytest.fixture
async def fake(serve_app: Callable[[web.Application], Awaitable[str]]) -> tuple[FakeArango, str]:
    upstream = FakeArango()
    return upstream, await serve_app(upstream.app())


async def test_immediate_reply_becomes_the_result(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake

    async def refuse() -> web.Response:
        return web.json_response(
            {"code": 412, "error": True, "errorMessage": "queue time violated", "errorNum": 21004},
            status=412,
        )

    upstream.submit_reply = refuse
    jobs = Client(http, await start_proxy(url))
    answer = await jobs.result(await jobs.submit("GET", "/_api/version"))
    assert answer.status == 412
    assert answer.json["errorNum"] == 21004


async def test_bare_503_is_retried(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    refusals = 2

    async def busy_then_accept() -> web.Response:
        nonlocal refusals
        if refusals:
            refusals -= 1
            return web.Response(status=503, text="<html>overloaded</html>")
        return await upstream._accepted()

    upstream.submit_reply = busy_then_accept
    jobs = Client(http, await start_proxy(url))
    answer = await jobs.result(await jobs.submit("GET", "/_api/version"))
    assert answer.status == 200
    assert refusals == 0


async def test_cancelled_while_being_sent_and_running_is_cancelled_by_arangodb(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """ArangoDB may have the job by then: it stays pending, the cancel goes to
    ArangoDB once its id is known, and ArangoDB's result (here its 410) is the job's."""
    upstream, url = fake
    upstream.release.clear()  # the 202 hangs until the job is cancelled here

    async def running_until_cancelled(upstream_id: str) -> web.Response:
        if ("PUT", f"/_api/job/{upstream_id}/cancel") not in upstream.seen:
            return web.Response(status=204)
        canceled = {"code": 410, "error": True, "errorMessage": "canceled request", "errorNum": 21}
        headers = {"x-arango-async-id": upstream_id, "x-told-by": "arangodb"}
        return web.json_response(canceled, status=410, headers=headers)

    upstream.fetch_reply = running_until_cancelled
    jobs = Client(http, await start_proxy(url))
    job_id = await jobs.submit("GET", "/_api/version")
    await asyncio.sleep(0.1)
    cancel = await jobs.call("PUT", f"/_api/job/{job_id}/cancel")
    assert cancel.json == {"result": True}
    assert (await jobs.call("GET", f"/_api/job/{job_id}")).status == 204  # still pending
    upstream.release.set()
    answer = await jobs.result(job_id)
    assert (answer.status, answer.json["errorNum"]) == (410, 21)
    assert answer.headers["x-told-by"] == "arangodb"
    assert ("PUT", "/_api/job/901/cancel") in upstream.seen
    assert ("DELETE", "/_api/job/901") not in upstream.seen


async def test_a_jobs_calls_to_arangodbs_job_api_go_to_its_own_database(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """ArangoDB's job API needs read access to the database in the path: the user of
    a job sent to /_db/shop may have none to _system. Its fetches, lists and cancels
    go to /_db/shop too."""
    upstream, url = fake

    async def running_until_cancelled(upstream_id: str) -> web.Response:
        if ("PUT", f"/_api/job/{upstream_id}/cancel") not in upstream.seen:
            return web.Response(status=204)
        return await upstream._result(upstream_id)

    upstream.fetch_reply = running_until_cancelled
    jobs = Client(http, await start_proxy(url))
    job_id = await jobs.submit("GET", "/_db/shop/_api/version")
    await eventually(lambda: ("GET", "/_db/shop/_api/job/pending") in upstream.seen_in_full)
    assert (await jobs.call("PUT", f"/_api/job/{job_id}/cancel")).json == {"result": True}
    assert (await jobs.result(job_id)).json == {"ok": "901"}
    job_api = [(method, path) for method, path in upstream.seen_in_full if "/_api/job" in path]
    assert ("PUT", "/_db/shop/_api/job/901/cancel") in job_api
    assert all(path.startswith("/_db/shop/_api/job/") for _, path in job_api), job_api


async def test_a_job_whose_database_is_dropped_while_it_runs_keeps_its_result(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """ArangoDB's jobs are per server, not per database: once the database is gone
    (its job API answers 404/1228), the job is fetched without it, and its result is
    the job's; it ran once. Lists are asked per database, so the user's jobs
    elsewhere are harvested as ever."""
    direct = Client(http, standin.url)
    assert (await direct.call("POST", "/_api/database", {"name": "tmp"})).status == 201
    jobs = Client(http, await start_proxy(standin.url))
    query = {"query": "RETURN SLEEP(0.8)"}
    doomed = await jobs.submit("POST", "/_db/tmp/_api/cursor", query)
    kept = await jobs.submit("POST", "/_api/cursor", query)
    started = ("POST", "/_db/tmp/_api/cursor"), ("POST", "/_api/cursor")
    await eventually(lambda: all(standin.executed[call] == 1 for call in started))
    assert (await direct.call("DELETE", "/_api/database/tmp")).status == 200
    assert (await jobs.result(kept)).status == 201
    answer = await jobs.result(doomed)
    assert (answer.status, answer.json["result"]) == (201, [None])
    assert standin.executed[started[0]] == 1


async def test_cancelled_while_being_sent_and_done_at_once_keeps_its_result(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The first look fetches the result: the job ran, and its result is the job's
    (a 410 "canceled request" would tell the client it had not run)."""
    upstream, url = fake
    upstream.release.clear()
    jobs = Client(http, await start_proxy(url))
    job_id = await jobs.submit("GET", "/_api/version")
    await asyncio.sleep(0.1)
    assert (await jobs.call("PUT", f"/_api/job/{job_id}/cancel")).json == {"result": True}
    upstream.release.set()
    answer = await jobs.result(job_id)
    assert (answer.status, answer.json) == (200, {"ok": "901"})
    await asyncio.sleep(harvester.MARK_AFTER * 5)  # a mark, or a late cancel, would be in
    assert ("PUT", "/_api/job/901/cancel") not in upstream.seen


async def test_cancelled_while_being_sent_and_refused_for_now_is_cancelled_here(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """ArangoDB did not take it (503): the job is not sent again but ends as
    ArangoDB ends a job cancelled in its queue."""
    upstream, url = fake
    upstream.release.clear()

    async def busy() -> web.Response:
        await upstream.release.wait()
        return web.Response(status=503, text="busy")

    upstream.submit_reply = busy
    jobs = Client(http, await start_proxy(url))
    job_id = await jobs.submit("GET", "/_api/version")
    await asyncio.sleep(0.1)
    assert (await jobs.call("PUT", f"/_api/job/{job_id}/cancel")).json == {"result": True}
    upstream.release.set()
    answer = await jobs.result(job_id)
    assert (answer.status, answer.json["errorNum"]) == (410, 21)
    assert upstream.seen_in_full.count(("GET", "/_api/version")) == 1


async def test_an_id_arangodb_gives_out_again_ends_the_job_that_had_it_as_lost(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A new ArangoDB (restarted on fresh data, or replaced) counts its job ids from
    the start again: the job that had an id is lost (here: run again), and the job
    that has it now gets its own result, never the other's."""
    upstream, url = fake
    restarted = False

    async def running_until_restart(upstream_id: str) -> web.Response:
        if upstream_id == "901" and not restarted:
            return web.Response(status=204)
        return await upstream._result(upstream_id)

    async def restart_then_accept() -> web.Response:
        # the restart comes with the next job: a fetch of the first job's id in between
        # would find a result that no job of the proxy's has yet
        nonlocal restarted
        restarted, upstream._next = True, 900
        upstream.submit_reply = upstream._accepted
        return await upstream._accepted()

    upstream.fetch_reply = running_until_restart
    jobs = Client(http, await start_proxy(url))
    first = await jobs.submit("GET", "/_api/version")
    await eventually(lambda: ("PUT", "/_api/job/901") in upstream.seen)
    await asyncio.sleep(harvester.MARK_AFTER * 5)  # marked submitted, still running
    upstream.submit_reply = restart_then_accept
    second = await jobs.submit("GET", "/_api/version")
    assert (await jobs.result(second)).json == {"ok": "901"}
    assert (await jobs.result(first)).json == {"ok": "902"}  # sent again: ArangoDB's 902


async def test_a_refused_harvest_ends_the_job_saying_it_may_have_run(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """ArangoDB took the job (202), then refuses its credentials when the proxy asks for
    the result (an expired JWT, a changed password): the job may have run, so its
    result is not ArangoDB's bare 401 (its client would take the job for refused),
    but a 500/4 that says so."""
    upstream, url = fake

    async def refused(upstream_id: str) -> web.Response:
        body: dict[str, Any] = {
            "error": True,
            "errorNum": 11,
            "errorMessage": "not authorized",
            "code": 401,
        }
        return web.Response(status=401, body=json.dumps(body), content_type="application/json")

    upstream.fetch_reply = refused
    jobs = Client(http, await start_proxy(url))
    answer = await jobs.call("GET", "/_api/version", headers={**ROOT, "x-arango-async": "store"})
    assert answer.async_id is not None
    await jobs.wait_done(answer.async_id)
    fetched = await jobs.call("PUT", f"/_api/job/{answer.async_id}")
    assert (fetched.status, fetched.json["errorNum"]) == (500, 4)
    message = fetched.json["errorMessage"]
    assert message.startswith("upstream ArangoDB refused this job's credentials (401)")
    assert "which may have run" in message


async def test_a_harvested_result_is_stored_only_for_the_copy_it_is_of(
    standin: StandIn,
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The harvester stores a result for the job at ArangoDB under the id it fetched it
    by, not for the job whatever copy it has: a job ArangoDB lost, requeued and sent
    again meanwhile (a restarted ArangoDB may even give its old id to another job)
    keeps its place for its new copy's result."""
    app, base = proxy_app
    store = app[STORE]
    jobs = Client(http, base)
    finishes: list[dict[str, Any]] = []
    finish = store.finish_nowait

    def noting(job_id: int, response: StoredResponse, **kwargs: Any) -> asyncio.Future[bool]:
        finishes.append(kwargs)
        return finish(job_id, response, **kwargs)

    monkeypatch.setattr(store, "finish_nowait", noting)
    slow = await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.3)"})
    await eventually(lambda: len(standin.jobs.entries) == 1)
    answer = await jobs.result(slow)
    assert answer.status == 201
    [job] = [kw for kw in finishes if kw.get("from_states") == (JobState.SUBMITTED,)]
    assert job["upstream_id"] is not None  # (marked while it ran: fetched by that id)


async def test_never_more_than_max_inflight_at_arangodb(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    jobs = Client(http, await start_proxy(standin.url, jobs={"max_inflight": 3}))
    direct = Client(http, standin.url)
    ids = [
        await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.05)"})
        for _ in range(12)
    ]
    most = 0
    while len((await jobs.call("GET", "/_api/job/done?count=100")).json) < len(ids):
        at_arangodb = len((await direct.call("GET", "/_api/job/pending?count=100")).json)
        most = max(most, at_arangodb)
        await asyncio.sleep(0.005)
    assert most == 3  # reached, never passed
    for job_id in ids:
        assert (await jobs.result(job_id)).status == 201


async def test_a_slot_is_free_once_arangodb_has_handed_the_result_over(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """max_inflight counts jobs at ArangoDB: a job whose result was fetched leaves
    its slot at once, while the proxy's writes about it (state submitted, the
    result) still wait for the store (held here)."""
    app = create_app(proxy_config(standin.url, tmp_path / "data", jobs={"max_inflight": 1}))
    base = await serve_proxy(app)
    store = app[STORE]
    held = asyncio.Event()
    monkeypatch.setattr(store, "mark_submitted", HeldBack(store.mark_submitted, held))
    monkeypatch.setattr(store, "finish_nowait", held_back_nowait(store.finish_nowait, held))
    jobs = Client(http, base)
    ids = [await jobs.submit("GET", "/_api/version") for _ in range(3)]
    # one after the other, each fetched from the stand-in, none recorded here yet
    await eventually(lambda: standin.executed[("GET", "/_api/version")] == len(ids))
    await eventually(lambda: not standin.jobs.entries)
    for job_id in ids:
        assert await store.state(int(job_id), None) is JobState.ACCEPTED
    held.set()
    for job_id in ids:
        assert (await jobs.result(job_id)).status == 200
    assert standin.executed[("GET", "/_api/version")] == len(ids)


async def test_failing_lists_and_fetches_only_delay_the_harvest(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Lists that fail (500, then a body that is not ArangoDB's) and a fetch that
    times out: the job stays submitted, and its result arrives once ArangoDB answers."""
    upstream, url = fake
    list_failures = ["500", "garbage", "500", "garbage"]
    slow_fetches = 1

    def flaky_list(which: str) -> web.Response:
        if list_failures:
            kind = list_failures.pop(0)
            if kind == "500":
                return web.json_response({"error": True, "code": 500}, status=500)
            return web.Response(status=200, text="<html>not json</html>")
        return upstream._list(which)

    async def slow_then_result(upstream_id: str) -> web.Response:
        nonlocal slow_fetches
        if slow_fetches:
            slow_fetches -= 1
            await asyncio.sleep(1.0)  # beyond upstream.request_timeout: a 504 inside
        return await upstream._result(upstream_id)

    upstream.list_reply = flaky_list
    upstream.fetch_reply = slow_then_result
    jobs = Client(http, await start_proxy(url, upstream={"request_timeout": 0.2}))
    answer = await jobs.result(await jobs.submit("GET", "/_api/version"))
    assert (answer.status, answer.json) == (200, {"ok": "901"})
    assert (list_failures, slow_fetches) == ([], 0)
    assert upstream.seen.count(("PUT", "/_api/job/901")) == 2


@pytest.mark.parametrize("workers", ["inline", "process"])
async def test_a_fetch_arangodb_never_answers_holds_up_no_other_job(
    fake: tuple[FakeArango, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    workers: str,
) -> None:
    """The fetch of one job hangs (under a long request_timeout): the jobs after it
    are harvested all the same. Each tick used to wait for every fetch it began."""
    upstream, url = fake
    release = asyncio.Event()

    async def hang_the_first(upstream_id: str) -> web.Response:
        if upstream_id == "901":
            await release.wait()
        return await upstream._result(upstream_id)

    upstream.fetch_reply = hang_the_first
    jobs = Client(
        http,
        await start_proxy(url, upstream={"request_timeout": 60}, jobs={"workers": workers}),
    )
    stuck = await jobs.submit("GET", "/_api/version")
    await eventually(lambda: ("PUT", "/_api/job/901") in upstream.seen)
    try:
        later = [await jobs.submit("GET", "/_api/version") for _ in range(5)]
        answers = [await jobs.result(job_id) for job_id in later]
        # (sent in order, but two sent together may reach ArangoDB either way round)
        assert sorted((a.status, a.json["ok"]) for a in answers) == [
            (200, str(n)) for n in range(902, 907)
        ]
        assert (await jobs.call("GET", f"/_api/job/{stuck}")).status == 204
    finally:
        release.set()
    assert (await jobs.result(stuck)).json == {"ok": "901"}


async def test_a_job_arangodb_loses_every_time_is_ended_after_max_reruns(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A job whose every fetch finds nothing (as when the result never gets through
    whole: ArangoDB forgets it as it hands it over) was sent again for ever."""
    upstream, url = fake

    async def gone(_upstream_id: str) -> web.Response:
        return web.json_response(
            {"code": 404, "error": True, "errorMessage": "not found", "errorNum": 404},
            status=404,
        )

    upstream.fetch_reply = gone
    jobs = Client(http, await start_proxy(url, jobs={"lost_job_policy": "rerun"}))
    answer = await jobs.result(await jobs.submit("POST", "/_api/document/c", body={}))
    assert answer.status == 500
    assert answer.json["errorNum"] == 4
    runs = harvester.MAX_RERUNS + 1
    assert f"it was lost {runs} times" in answer.json["errorMessage"]
    submissions = [call for call in upstream.seen if call == ("POST", "/_api/document/c")]
    assert len(submissions) == runs


async def test_a_job_arangodb_forgets_before_its_first_look_is_sent_again_at_once(
    fake: tuple[FakeArango, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ArangoDB restarted between its 202 and the job's first look (404): the job is
    lost, and under rerun sent again once it is marked, not at the next check for
    lost jobs (here never) nor by a list (empty here)."""
    monkeypatch.setattr(harvester, "LOST_CHECK_INTERVAL", 3600.0)
    upstream, url = fake
    upstream.list_reply = lambda _which: web.json_response([])

    async def forgotten_once(upstream_id: str) -> web.Response:
        if upstream_id == "901":
            return web.json_response(
                {"code": 404, "error": True, "errorMessage": "not found", "errorNum": 404},
                status=404,
            )
        return await upstream._result(upstream_id)

    upstream.fetch_reply = forgotten_once
    jobs = Client(http, await start_proxy(url, jobs={"lost_job_policy": "rerun"}))
    answer = await jobs.result(await jobs.submit("GET", "/_api/version"))
    assert answer.json == {"ok": "902"}
    assert upstream.seen.count(("PUT", "/_api/job/901")) == 1


class FailFirst:
    """A store method whose first `left` calls raise StoreError (or `kind`), then it
    works."""

    def __init__(
        self,
        method: Callable[..., Awaitable[Any]],
        left: int,
        error: str,
        kind: type[Exception] = StoreError,
    ) -> None:
        self.method = method
        self.left = left
        self.error = error
        self.kind = kind
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.kind(f"{self.error} (injected)")
        return await self.method(*args, **kwargs)


class HeldBack:
    """A store method that waits until `release` is set, then works."""

    def __init__(self, method: Callable[..., Awaitable[Any]], release: asyncio.Event) -> None:
        self.method = method
        self.release = release
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await self.release.wait()
        return await self.method(*args, **kwargs)


def held_back_nowait(
    method: Callable[..., Awaitable[Any]], release: asyncio.Event
) -> Callable[..., asyncio.Future[Any]]:
    """HeldBack for a store method that returns its future at once (`finish_nowait`)."""

    def call(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        async def held() -> Any:
            await release.wait()
            return await method(*args, **kwargs)

        return asyncio.ensure_future(held())

    return call


@pytest.fixture(params=["inline", "process"])
async def proxy_app(
    request: pytest.FixtureRequest,
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
) -> tuple[web.Application, str]:
    """The proxy in front of the stand-in, with its application at hand (store,
    metrics); dispatcher and harvester in its process, or in the worker process
    (which reaches the same store, faults and all)."""
    config = proxy_config(standin.url, tmp_path / "data", jobs={"workers": request.param})
    app = create_app(config)
    return app, await serve_proxy(app)


@pytest.mark.parametrize("kind", [StoreError, RuntimeError], ids=["store error", "a bug"])
async def test_store_read_failure_in_dispatcher_is_retried(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    kind: type[Exception],
) -> None:
    """A read error cannot be produced on demand in SQLite: the store's method
    fails (mock) twice, then works; the dispatcher backs off and goes on. So it
    does after an error it did not expect (a bug): its loop must not end."""
    app, base = proxy_app
    failing = FailFirst(app[STORE].next_accepted, 2, "disk I/O error", kind)
    monkeypatch.setattr(app[STORE], "next_accepted", failing)
    # (the worker process's look is answered from memory when it can: not here)
    monkeypatch.setattr(app[STORE], "next_accepted_now", lambda *_: UNKNOWN)
    jobs = Client(http, base)
    answer = await jobs.result(await jobs.submit("GET", "/_api/version"))
    assert answer.status == 200
    assert failing.left == 0
    # the worker process reports its counts every COUNT_EVERY seconds
    await eventually(lambda: app[METRICS]["submit_retries_total"] >= 2)


async def test_recording_a_submission_is_retried_not_sent_again(
    standin: StandIn,
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ArangoDB took the job, still running at its first look, then the store fails
    to record it (mocked: SQLite cannot be made to fail one statement on demand): the
    write is retried, the job is not sent a second time."""
    app, base = proxy_app
    failing = FailFirst(app[STORE].mark_submitted, 2, "database or disk is full")
    monkeypatch.setattr(app[STORE], "mark_submitted", failing)
    jobs = Client(http, base)
    answer = await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.2)"})
    assert (await jobs.result(answer)).status == 201
    assert failing.left == 0
    assert standin.executed[("POST", "/_api/cursor")] == 1


async def test_an_async_fetch_keeps_the_result_it_took_when_storing_it_fails(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An async PUT /_api/job/{id} takes that job's result: storing it as its own
    result is retried until the store takes it. Run again, it would find nothing."""
    app, base = proxy_app
    jobs = Client(http, base)
    taken = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(taken)
    store = app[STORE]
    finish = store.finish_nowait  # (finish's too)
    failures = 2

    def failing(job_id: int, response: StoredResponse, **kwargs: Any) -> asyncio.Future[bool]:
        nonlocal failures
        if failures and dict(response.headers).get("x-arango-async-id") == taken:
            failures -= 1
            failed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            failed.set_exception(StoreError("database or disk is full (injected)"))
            return failed
        return finish(job_id, response, **kwargs)

    monkeypatch.setattr(store, "finish_nowait", failing)
    fetching = await jobs.submit("PUT", f"/_api/job/{taken}")
    answer = await jobs.result(fetching)
    assert failures == 0
    assert (answer.status, answer.json["server"]) == (200, "arango")


@pytest.mark.parametrize("what", ["fetch", "delete"])
async def test_a_store_error_in_a_job_for_the_job_api_is_retried_not_kept_as_its_result(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    """ArangoDB's own 503s are retried, never kept as a job's result; nor is the proxy's
    store failing while it runs a job for the job API (the read of a fetch, the write
    of a delete): the job stays accepted and runs again."""
    app, base = proxy_app
    jobs = Client(http, base)
    taken = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(taken)
    store = app[STORE]
    if what == "fetch":
        failing = FailFirst(store.take_result, 2, "disk I/O error")
        monkeypatch.setattr(store, "take_result", failing)
        answer = await jobs.result(await jobs.submit("PUT", f"/_api/job/{taken}"))
        assert (answer.status, answer.json["server"]) == (200, "arango")
    else:
        failing = FailFirst(store.delete, 2, "database or disk is full")
        monkeypatch.setattr(store, "delete", failing)
        answer = await jobs.result(await jobs.submit("DELETE", f"/_api/job/{taken}"))
        assert (answer.status, answer.json) == (200, {"result": True})
    assert failing.left == 0


async def test_a_result_an_async_fetch_took_is_back_when_a_bug_ends_the_fetch(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storing the fetch's result fails with an error the proxy did not expect (a bug,
    mocked): the result it took is back, and the fetch, run again, finds it."""
    app, base = proxy_app
    jobs = Client(http, base)
    taken = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(taken)
    store = app[STORE]
    failing = FailFirst(store.finish, 1, "a bug", RuntimeError)
    monkeypatch.setattr(store, "finish", failing)
    answer = await jobs.result(await jobs.submit("PUT", f"/_api/job/{taken}"))
    assert (answer.status, answer.json["server"]) == (200, "arango")
    assert failing.left == 0


class HeldFinish:
    """The store's finish of results that carry `fetched` as their x-arango-async-id
    (an async fetch of that job storing what it took) held until `release`."""

    def __init__(self, store: JobStore, fetched: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = asyncio.Event()
        self.held = 0
        self.outcomes: list[bool] = []
        self._finish = store.finish_nowait  # (finish's too)
        self._fetched = fetched
        monkeypatch.setattr(store, "finish_nowait", self._finish_nowait)

    def _finish_nowait(
        self, job_id: int, response: StoredResponse, **kwargs: Any
    ) -> asyncio.Future[bool]:
        if dict(response.headers).get("x-arango-async-id") != self._fetched:
            return self._finish(job_id, response, **kwargs)
        self.held += 1

        async def later() -> bool:
            await self.release.wait()
            changed = await self._finish(job_id, response, **kwargs)
            self.outcomes.append(changed)
            return changed

        return asyncio.ensure_future(later())


async def an_async_fetch_held(
    app: web.Application, jobs: Client, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, HeldFinish]:
    """A job done, and an async fetch of it (PUT /_api/job/{id} as a job) that took its
    result and whose write of it is held: the two ids, and the hold."""
    taken = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(taken)
    held = HeldFinish(app[STORE], taken, monkeypatch)
    fetching = await jobs.submit("PUT", f"/_api/job/{taken}")
    await eventually(lambda: held.held == 1)
    return taken, fetching, held


def rows_of(folder: Path) -> dict[int, str]:
    """The jobs in the store's file, as a proxy started on it now would find them."""
    with contextlib.closing(sqlite3.connect(folder / "jobs.sqlite3")) as db:
        return dict(db.execute("SELECT id, state FROM jobs"))


async def test_an_async_fetch_deletes_the_result_it_took_only_once_its_own_is_stored(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """An async PUT /_api/job/{id} takes that job's result and stores it as its own.
    Had the taken job's delete committed first, a crash between the two writes would
    lose the result: the fetch, run again, would find nothing. Until the fetch's
    result commits, the file still holds the taken one (to clients it is gone)."""
    app, base = proxy_app
    jobs = Client(http, base)
    taken, fetching, held = await an_async_fetch_held(app, jobs, monkeypatch)
    store = app[STORE]
    assert (await jobs.call("GET", f"/_api/job/{taken}")).status == 404
    await asyncio.sleep(0.3)  # (longer than a taken result's delete waits for a batch)
    await store.flush()
    assert rows_of(tmp_path / "data") == {int(taken): "done", int(fetching): "accepted"}
    held.release.set()
    answer = await jobs.result(fetching)
    assert (answer.status, answer.json["server"]) == (200, "arango")
    await store.flush()
    assert rows_of(tmp_path / "data") == {}  # (the fetched result is gone too)


async def test_a_result_an_async_fetch_took_is_still_there_when_a_stop_ends_the_fetch(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The proxy stops before the fetch's own result is stored: the fetch stays
    accepted, to run again at the next start, and the result it took is in the file,
    for that run (or any fetch) after the start."""
    app, base = proxy_app
    jobs = Client(http, base)
    taken, fetching, _ = await an_async_fetch_held(app, jobs, monkeypatch)
    store = app[STORE]
    workers = app[DISPATCHER]
    assert isinstance(workers, Workers | WorkerProcess)
    await workers.stop(0.2)
    await store.close()
    assert rows_of(tmp_path / "data") == {int(taken): "done", int(fetching): "accepted"}
    reopened = await JobStore.open(tmp_path / "data")
    try:
        assert await reopened.take_result(int(taken), None) is not None
    finally:
        await reopened.close()


@pytest.mark.parametrize("what", ["{done}", "all", "expired?stamp={later}"])
async def test_a_delete_run_as_a_job_deletes_nothing_until_its_answer_can_be_stored(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    what: str,
) -> None:
    """DELETE /_api/job/... sent as an async job: what it deletes is in the file only
    with its answer. While the store cannot store any job's result (a fault: SQLite
    refuses to write the column), the job deletes nothing. (Had it deleted in a write
    of its own, a crash then would run it again after the start: a 404 for the job it
    deleted, or ``all`` forgetting the jobs accepted since.) Once the fault has
    passed, it runs."""
    app, base = proxy_app
    jobs = Client(http, base)
    done = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(done)
    store = app[STORE]
    denied = 0

    def authorize(action: int, table: str | None, column: str | None, *_: Any) -> int:
        nonlocal denied
        if action == sqlite3.SQLITE_UPDATE and (table, column) == ("jobs", "status"):
            denied += 1
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    await store._writer.call(lambda conn: conn.set_authorizer(authorize))
    deleting = await jobs.submit(
        "DELETE", "/_api/job/" + what.format(done=done, later=time.time() + 60)
    )
    await eventually(lambda: denied >= 3)  # (the job was tried more than once)
    await store.flush()
    assert rows_of(tmp_path / "data") == {int(done): "done", int(deleting): "accepted"}
    await store._writer.call(lambda conn: conn.set_authorizer(None))
    if what == "{done}":
        answer = await jobs.result(deleting)
        assert (answer.status, answer.json) == (200, {"result": True})
    else:  # (it deleted itself as well, as in ArangoDB: no answer is kept)
        await eventually(lambda: rows_of(tmp_path / "data") == {})
        await store.flush()  # (the file may be a moment ahead of the store's memory)
    assert (await jobs.call("GET", f"/_api/job/{done}")).status == 404


async def test_a_job_a_dead_worker_process_marked_after_it_was_sent_again_is_harvested(
    standin: StandIn,
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker process died while its mark waited in the store's queue; the next one
    sent the job again, and the old mark commits before the new one: the new copy is
    abandoned, and the job is harvested under the copy the store has."""
    app, base = proxy_app
    store = app[STORE]
    mark = store.mark_submitted
    direct = Client(http, standin.url)
    query = {"query": "RETURN SLEEP(0.3)"}  # still running at its first look: marked
    others: list[str] = []

    async def marked_first_by_a_dead_worker(job_id: int, upstream_id: str) -> Mark:
        if not others:
            others.append(await direct.submit("POST", "/_api/cursor", body=query))
            await mark(job_id, others[0])
        return await mark(job_id, upstream_id)

    monkeypatch.setattr(store, "mark_submitted", marked_first_by_a_dead_worker)
    jobs = Client(http, base)
    answer = await jobs.result(await jobs.submit("POST", "/_api/cursor", body=query))
    assert answer.status == 201
    assert standin.executed[("POST", "/_api/cursor")] == 2
    assert (await direct.call("GET", f"/_api/job/{others[0]}")).status == 404  # harvested


async def test_a_job_done_at_its_first_look_is_never_marked_submitted(
    standin: StandIn,
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its result is stored straight from state accepted: one write, not two."""
    app, base = proxy_app
    store = app[STORE]
    marks = FailFirst(store.mark_submitted, 0, "")  # (fails none: counts the calls)
    monkeypatch.setattr(store, "mark_submitted", marks)
    jobs = Client(http, base)
    ids = [await jobs.submit("GET", "/_api/version") for _ in range(5)]
    for job_id in ids:
        assert (await jobs.result(job_id)).status == 200
    assert marks.calls == 0
    assert standin.executed[("GET", "/_api/version")] == len(ids)
    # (counted in the worker process, when there is one: its counts arrive every 0.1 s)
    await eventually(lambda: app[METRICS]["jobs_submitted_total"] == len(ids))


async def test_a_result_found_at_the_first_look_is_never_marked_while_it_is_stored(
    fake: tuple[FakeArango, str],
    serve_proxy: Callable[[web.Application], Awaitable[str]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first look has its answer, the result: its write taking longer than
    MARK_AFTER (a busy store) must not start the mark, which would find the job
    done and send ArangoDB a cancel and a delete for a job it no longer has."""
    upstream, url = fake
    app = create_app(proxy_config(url, tmp_path / "data"))
    jobs = Client(http, await serve_proxy(app))
    store = app[STORE]
    marks = FailFirst(store.mark_submitted, 0, "")  # (fails none: counts the calls)
    monkeypatch.setattr(store, "mark_submitted", marks)
    finish = store.finish

    async def slow_finish(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(harvester.MARK_AFTER * 3)
        return await finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish", slow_finish)
    assert (await jobs.result(await jobs.submit("GET", "/_api/version"))).json == {"ok": "901"}
    await asyncio.sleep(harvester.MARK_AFTER * 2)  # a mark, and what follows it, would be in
    assert marks.calls == 0
    assert [call for call in upstream.seen if call[1] != "/_api/version"] == [
        ("PUT", "/_api/job/901")
    ]


async def test_a_result_after_the_mark_began_waits_for_it(
    standin: StandIn,
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job still running at its first look is marked submitted; its result, fetched
    while that write is held, is stored only after it (states never go backwards)."""
    app, base = proxy_app
    store = app[STORE]
    held = asyncio.Event()
    marks = HeldBack(store.mark_submitted, held)
    monkeypatch.setattr(store, "mark_submitted", marks)
    jobs = Client(http, base)
    job_id = await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.2)"})
    # fetched from the stand-in (which then forgets it) while still accepted here
    await eventually(lambda: standin.executed[("POST", "/_api/cursor")] == 1)
    await eventually(lambda: marks.calls == 1)
    await eventually(lambda: not standin.jobs.entries)
    assert await store.state(int(job_id), None) is JobState.ACCEPTED
    held.set()
    answer = await jobs.result(job_id)
    assert answer.status == 201
    assert standin.executed[("POST", "/_api/cursor")] == 1


async def test_a_job_whose_first_look_is_late_is_marked_submitted_meanwhile(
    fake: tuple[FakeArango, str],
    serve_proxy: Callable[[web.Application], Awaitable[str]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The first look's fetch hangs: the dispatcher does not wait for it longer than
    MARK_AFTER, and records the job as submitted (a restart would then harvest it,
    not send it again); the result, when it comes, is stored after that."""
    upstream, url = fake
    held = asyncio.Event()

    async def late(upstream_id: str) -> web.Response:
        await held.wait()
        return web.json_response({"late": upstream_id}, headers={"x-arango-async-id": upstream_id})

    upstream.fetch_reply = late
    app = create_app(proxy_config(url, tmp_path / "data"))
    jobs = Client(http, await serve_proxy(app))
    job_id = int(await jobs.submit("GET", "/_api/version"))
    await eventually(lambda: ("PUT", "/_api/job/901") in upstream.seen)  # the look began
    store = app[STORE]
    for _ in range(100):
        if await store.state(job_id, None) is JobState.SUBMITTED:
            break
        await asyncio.sleep(harvester.MARK_AFTER / 4)
    else:
        pytest.fail("not marked submitted while its first look was under way")
    held.set()
    assert (await jobs.result(str(job_id))).json == {"late": "901"}


async def test_new_job_is_harvested_without_waiting_out_a_long_poll(
    fake: tuple[FakeArango, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long-running job stretches the poll interval (here to 10 s); a new job
    shortens the wait, so its result comes long before the interval is over."""
    monkeypatch.setattr(harvester, "POLL_MIN", 10.0)
    monkeypatch.setattr(harvester, "POLL_MAX", 10.0)
    upstream, url = fake
    upstream.list_reply = lambda which: web.json_response(
        [str(i) for i in range(902, upstream._next + 1)] if which == "done" else ["901"]
    )
    jobs = Client(http, await start_proxy(url))
    await jobs.submit("GET", "/_api/version")  # 901: pending at ArangoDB for ever
    for _ in range(100):
        if ("GET", "/_api/job/pending") in upstream.seen:
            break  # the first tick is over: the harvester now waits 10 s
        await asyncio.sleep(0.01)
    quick = await jobs.submit("GET", "/_api/version")
    async with asyncio.timeout(5.0):  # half the poll interval
        await jobs.wait_done(quick)


async def test_a_long_running_job_is_listed_at_least_every_poll_max(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The ticks follow the job's age (a twentieth of it) up to POLL_MAX and no
    further: a job running for 0.6 s and more is still listed every POLL_MAX, not every
    30 ms or more, so its end is noticed within POLL_MAX (issue 3's target: a median of
    at most 20 ms). Counted with room for a slow machine: at least half the lists
    POLL_MAX allows."""
    upstream, url = fake
    listed: list[float] = []

    def pending_for_ever(which: str) -> web.Response:
        listed.append(time.monotonic())
        return web.json_response([] if which == "done" else ["901"])

    async def running(upstream_id: str) -> web.Response:
        return web.Response(status=204)

    upstream.list_reply = pending_for_ever
    upstream.fetch_reply = running
    jobs = Client(http, await start_proxy(url))
    await jobs.submit("GET", "/_api/version")
    sent = time.monotonic()
    await asyncio.sleep(1.0)
    late = [t for t in listed if t - sent >= 0.6]  # ticks of 30-50 ms were it not capped
    assert len(late) >= 0.4 / harvester.POLL_MAX / 2


async def test_new_jobs_do_not_make_the_lists_come_faster(
    fake: tuple[FakeArango, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each new job gets its first look at once, but the done list (for a job that
    runs on) keeps its own pace (here 10 s), however many new jobs come."""
    monkeypatch.setattr(harvester, "POLL_MIN", 10.0)
    monkeypatch.setattr(harvester, "POLL_MAX", 10.0)
    upstream, url = fake
    upstream.list_reply = lambda which: web.json_response([] if which == "done" else ["901"])

    async def result_unless_901(upstream_id: str) -> web.Response:
        if upstream_id == "901":
            return web.Response(status=204)
        return await upstream._result(upstream_id)

    upstream.fetch_reply = result_unless_901
    jobs = Client(http, await start_proxy(url))
    await jobs.submit("GET", "/_api/version")  # 901: pending at ArangoDB for ever
    await eventually(lambda: ("PUT", "/_api/job/901") in upstream.seen)  # its first look
    async with asyncio.timeout(5.0):
        for _ in range(5):
            await jobs.wait_done(await jobs.submit("GET", "/_api/version"))
    # (a tick for each new job would have listed 901 each time, five lists)
    assert lists(upstream) <= 1


async def test_short_job_costs_one_fetch_and_a_running_one_is_listed(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The first look fetches a finished job directly (no list); a job still
    running there (204) is fetched once the pending list no longer has it."""
    upstream, url = fake
    running = {"902"}

    async def result_unless_running(upstream_id: str) -> web.Response:
        if upstream_id in running:
            return web.Response(status=204)
        return await upstream._result(upstream_id)

    upstream.fetch_reply = result_unless_running
    upstream.list_reply = lambda which: web.json_response(
        [i for i in ("901", "902") if i not in running] if which == "done" else sorted(running)
    )
    jobs = Client(http, await start_proxy(url))
    short = await jobs.submit("GET", "/_api/version")
    assert (await jobs.result(short)).json == {"ok": "901"}
    assert upstream.seen.count(("PUT", "/_api/job/901")) == 1
    assert lists(upstream) == 0

    long = await jobs.submit("GET", "/_api/version")
    for _ in range(200):
        if ("PUT", "/_api/job/902") in upstream.seen:
            break  # first look done: 204
        await asyncio.sleep(0.01)
    running.clear()
    assert (await jobs.result(long)).json == {"ok": "902"}
    assert ("GET", "/_api/job/pending") in upstream.seen
    assert upstream.seen.count(("PUT", "/_api/job/902")) == 2


async def test_results_the_user_left_unfetched_at_arangodb_do_not_hide_a_finished_job(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same user left more results at ArangoDB, directly, than a done list of
    the proxy's size holds (the stand-in lists ids in ascending order: theirs first).
    The proxy's job, running at its first look, is fetched once it leaves the pending
    list, not at the next check for lost jobs (here never)."""
    monkeypatch.setattr(harvester, "LIST_SLACK", 3)
    monkeypatch.setattr(harvester, "LOST_CHECK_INTERVAL", 3600.0)
    direct = Client(http, standin.url)
    for _ in range(10):
        await direct.submit("GET", "/_api/version")
    for _ in range(500):
        if len((await direct.call("GET", "/_api/job/done")).json) == 10:
            break  # all ten done, unfetched
        await asyncio.sleep(0.01)
    jobs = Client(http, await start_proxy(standin.url))
    job_id = await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.3)"})
    await jobs.wait_done(job_id, seconds=3.0)
    answer = await jobs.call("PUT", f"/_api/job/{job_id}")
    assert (answer.status, answer.json["result"]) == (201, [None])
    assert len((await direct.call("GET", "/_api/job/done")).json) == 10  # theirs, left there


async def test_a_long_pending_list_falls_back_to_the_done_list(
    standin_factory: Callable[..., Awaitable[StandIn]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More of the user's jobs pending at ArangoDB than a pending list of the proxy's
    size holds: it cannot tell which are done, the done list can."""
    monkeypatch.setattr(harvester, "LIST_SLACK", 3)
    monkeypatch.setattr(harvester, "LOST_CHECK_INTERVAL", 3600.0)
    standin = await standin_factory(workers=8)
    direct = Client(http, standin.url)
    for _ in range(5):
        await direct.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(5)"})
    jobs = Client(http, await start_proxy(standin.url))
    job_id = await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(0.3)"})
    await jobs.wait_done(job_id, seconds=3.0)
    assert (await jobs.call("PUT", f"/_api/job/{job_id}")).status == 201
    assert len((await direct.call("GET", "/_api/job/pending")).json) == 5  # still running


async def test_a_lost_job_a_long_pending_list_hides_is_found_by_the_lost_check(
    fake: tuple[FakeArango, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pending list is cut short (others' jobs fill it) and the done list does not
    have the job: the check for lost jobs finds it on neither, and its fetch (404)
    says ArangoDB lost it: run again."""
    monkeypatch.setattr(harvester, "LIST_SLACK", 3)
    monkeypatch.setattr(harvester, "LOST_CHECK_INTERVAL", 0.05)
    upstream, url = fake
    upstream.list_reply = lambda which: web.json_response(
        ["1", "2", "3", "4"] if which == "pending" else []
    )
    looks = {"901": 0}

    async def running_then_forgotten(upstream_id: str) -> web.Response:
        if upstream_id != "901":
            return await upstream._result(upstream_id)
        looks["901"] += 1
        if looks["901"] == 1:
            return web.Response(status=204)  # its first look: running
        return web.json_response(
            {"code": 404, "error": True, "errorMessage": "not found", "errorNum": 404},
            status=404,
        )

    upstream.fetch_reply = running_then_forgotten
    jobs = Client(http, await start_proxy(url, jobs={"lost_job_policy": "rerun"}))
    answer = await jobs.result(await jobs.submit("GET", "/_api/version"))
    assert answer.json == {"ok": "902"}
    assert looks["901"] == 2
    assert ("GET", "/_api/job/done") in upstream.seen


async def test_a_whole_pending_list_leaves_the_check_for_lost_jobs_nothing_to_ask(
    fake: tuple[FakeArango, str],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check for lost jobs is due at every tick here, and the job runs for a
    while: the pending lists are whole (shorter than asked for), and each sends any job
    of ours not on it, a lost one too, to its fetch, so no done list is asked for."""
    monkeypatch.setattr(harvester, "LOST_CHECK_INTERVAL", 0.0)
    upstream, url = fake
    running = asyncio.Event()
    running.set()

    async def result_once_finished(upstream_id: str) -> web.Response:
        if running.is_set():
            return web.Response(status=204)
        return await upstream._result(upstream_id)

    upstream.fetch_reply = result_once_finished
    upstream.list_reply = lambda which: web.json_response(
        ["901"] if which == "pending" and running.is_set() else []
    )
    jobs = Client(http, await start_proxy(url))
    job_id = await jobs.submit("GET", "/_api/version")
    asyncio.get_running_loop().call_later(0.3, running.clear)
    assert (await jobs.result(job_id)).json == {"ok": "901"}
    assert upstream.seen.count(("GET", "/_api/job/pending")) >= 5
    assert ("GET", "/_api/job/done") not in upstream.seen


async def test_a_job_whose_fetch_is_under_way_is_not_listed(
    fake: tuple[FakeArango, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The first look's fetch is slow to answer: the ticks meanwhile (every few ms)
    ask for no done list, the fetch answers for the job."""
    upstream, url = fake
    answer = asyncio.Event()

    async def slow_result(upstream_id: str) -> web.Response:
        await answer.wait()
        return await upstream._result(upstream_id)

    upstream.fetch_reply = slow_result
    jobs = Client(http, await start_proxy(url))
    job_id = await jobs.submit("GET", "/_api/version")
    for _ in range(200):
        if ("PUT", "/_api/job/901") in upstream.seen:
            break  # the first look is under way
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # many ticks of 5 ms
    assert lists(upstream) == 0
    answer.set()
    assert (await jobs.result(job_id)).json == {"ok": "901"}
    assert upstream.seen.count(("PUT", "/_api/job/901")) == 1


async def test_a_queue_time_limit_is_held_against_the_proxys_own_queue(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """x-arango-queue-time-seconds, as ArangoDB: 412/21004 at once, nothing stored,
    when the oldest job waiting in the proxy has waited longer (here ArangoDB's queue
    is full, so jobs wait); a longer limit is accepted. Both of the proxy's paths, and
    the job API's requests."""
    jobs = RawClient(http, await start_proxy(standin.url))
    standin.queue_full = True
    waiting = await jobs.submit("GET", "/_api/version")
    await asyncio.sleep(0.5)
    for path in ("/_api/version", "/_api/%76ersion"):
        for limit, status in (("0.2", 412), ("30", 202)):
            headers = {"x-arango-async": "store", "x-arango-queue-time-seconds": limit}
            answer = await jobs.call("GET", path, headers=headers)
            assert answer.status == status, (path, limit)
            if status == 412:
                assert answer.json["errorNum"] == 21004
                assert answer.json["errorMessage"] == "queue time violated"
                assert answer.async_id is None
    # ArangoDB holds every request to it, the job API's too; the fast path's
    # /_api/job/... and the odd one aiohttp's path takes
    for path in ("/_api/job/pending", "/_api/job//pending", f"/_api/job/{waiting}"):
        for limit, status in (("0.2", 412), ("30", 204 if path.endswith(waiting) else 200)):
            headers = {"x-arango-queue-time-seconds": limit}
            answer = await jobs.call("GET", path, headers=headers)
            assert answer.status == status, (path, limit)
            if status == 412:
                assert answer.json["errorNum"] == 21004
    standin.queue_full = False
    assert (await jobs.result(waiting)).status == 200
    pending = (await jobs.call("GET", "/_api/job/pending")).json
    done = (await jobs.call("GET", "/_api/job/done")).json  # (one may be in both lists)
    assert len(set(pending) | set(done)) == 2  # the two accepted with the longer limit


async def test_a_cancel_that_never_catches_its_job_says_so(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each try of a cancel fails when the job moved on meanwhile, and the facade looks
    again. A job seen pending after the last try was not cancelled: 503, not 200.
    (Mocked: a job that changes state eight times during one cancel cannot be made.)"""
    app, base = proxy_app
    jobs = Client(http, base)
    job_id = int(await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(2)"}))
    job = await app[STORE].get(job_id, None)  # pending: accepted, or at ArangoDB
    assert job is not None
    tries = 0

    async def moved_on(*_args: Any) -> bool:
        nonlocal tries
        tries += 1
        return False

    async def still_pending(*_args: Any) -> Any:
        return job

    monkeypatch.setattr(app[STORE], "cancel_accepted", moved_on)
    monkeypatch.setattr(app[STORE], "cancel_submitted", moved_on)
    monkeypatch.setattr(app[STORE], "get", still_pending)
    answer = await jobs.call("PUT", f"/_api/job/{job_id}/cancel")
    assert (answer.status, answer.json["errorNum"]) == (503, 503), answer.json
    assert "try again" in answer.json["errorMessage"]
    assert tries == jobs_api.CANCEL_TRIES


async def test_a_cancel_recorded_but_never_sent_is_sent_at_the_next_start(
    standin_factory: Callable[..., Awaitable[StandIn]],
    serve_proxy: Callable[[web.Application], Awaitable[str]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A cancel of a job at ArangoDB is recorded, then sent; the process may die
    between the two (kill -9 of the proxy, or of the worker process during its mark).
    The store as it is left then (made here with its own calls): the next start
    sends the cancel. The job waits behind a slow query at ArangoDB's one worker, so
    the cancel still finds it queued there, and its result is 410/21."""
    standin = await standin_factory(workers=1)
    direct = Client(http, standin.url)
    await direct.submit("POST", "/_api/cursor", body={"query": "RETURN SLEEP(1)"})
    upstream_id = await direct.submit("GET", "/_api/version")  # queued behind it
    folder = tmp_path / "data"
    job = new_job(
        user="root", method="GET", target="/_api/version", headers=(), auth=ROOT["authorization"]
    )
    store = await JobStore.open(folder)
    try:
        job_id = await store.accept(job)
        assert await store.mark_submitted(job_id, upstream_id) is Mark.SUBMITTED
        assert await store.cancel_submitted(job_id, upstream_id)
    finally:
        await store.close()
    jobs = Client(http, await serve_proxy(create_app(proxy_config(standin.url, folder))))
    answer = await jobs.result(str(job_id))
    assert (answer.status, answer.json["errorNum"]) == (410, 21), answer.json
    assert standin.executed[("GET", "/_api/version")] == 0


async def test_writes_that_failed_together_are_retried_apart() -> None:
    """A batch fails as a whole: results that together overshoot the store's size
    limit, where each alone fits, fail again and again if their retries keep meeting
    in one batch. Here a write fails whenever another one came within 5 ms of it; the
    retries of five such writes, all failed at once, must come apart."""
    tries: list[float] = []

    async def write() -> bool:
        loop = asyncio.get_running_loop()
        mine = loop.time()
        tries.append(mine)
        await asyncio.sleep(0.005)  # the batch forms
        if sum(1 for other in tries if abs(other - mine) < 0.005) > 1:
            raise StoreError("database or disk is full (injected)")
        return True

    done = await asyncio.wait_for(
        asyncio.gather(*(record(f"write {k}", write) for k in range(5))), 20
    )
    assert done == [True] * 5
    assert len(tries) > 5  # (they did fail together first)

"""The dispatcher and harvester in their own process (jobs.workers = "process").

The worker process reaches the proxy's store over a socket pair; these tests
check what that adds: the same jobs, results and counters as in one process,
a job for the job API run by the proxy on the child's behalf, a dead child
started again with nothing lost, a kill -9 of the proxy taking the child with
it, and a Ctrl-C to the whole process group stopping both in order. (The store
faults of tests/test_dispatch.py run against both modes; the tests of the
command, crash, shutdown and torture run the proxy as users do, in this mode.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import worker_process
from proxy.app import create_app
from proxy.channel import Channel
from proxy.state import DISPATCHER, METRICS, STORE
from proxy.worker_process import WorkerProcess
from storage import Job, JobMode, JobState, ResultTooLarge, StoredResponse, core
from tests.conftest import proxy_config
from tests.processes import ProxyProcess
from tests.standin import StandIn
from tests.standin.client import Client, eventually
from tests.test_dispatch import an_async_fetch_held


@pytest.fixture
async def proxy_app(
    standin: StandIn, serve_proxy: Callable[..., Awaitable[str]], tmp_path: Path
) -> tuple[web.Application, str]:
    config = proxy_config(standin.url, tmp_path / "data", jobs={"workers": "process"})
    app = create_app(config)
    return app, await serve_proxy(app)


def child_of(app: web.Application) -> int:
    workers = app[DISPATCHER]
    assert isinstance(workers, WorkerProcess)
    assert workers.pid is not None
    return workers.pid


def status(pid: int) -> list[str]:
    """/proc/PID/stat after the name: state, parent, ...; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    # a zombie ("Z") has exited; only its exit status waits for its parent
    return status(pid)[:1] not in ([], ["Z"])


async def test_jobs_run_and_are_counted_as_in_one_process(
    standin: StandIn, proxy_app: tuple[web.Application, str], http: aiohttp.ClientSession
) -> None:
    app, base = proxy_app
    jobs = Client(http, base)
    ids = [
        await jobs.submit("POST", "/_api/cursor", body={"query": f"RETURN {i}"}) for i in range(20)
    ]
    await jobs.submit("POST", "/_api/cursor", body={"query": "RETURN 99"}, mode="true")
    for i, job_id in enumerate(ids):
        answer = await jobs.result(job_id)
        assert (answer.status, answer.json["result"]) == (201, [i])
    await eventually(lambda: standin.executed[("POST", "/_api/cursor")] == 21)
    counts = app[METRICS]
    await eventually(
        lambda: (counts["jobs_submitted_total"], counts["jobs_harvested_total"]) == (21, 21)
    )
    assert int(status(child_of(app))[1]) == os.getpid()


async def test_the_childs_looks_and_results_take_no_task_in_the_proxy(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its commonest calls, a look for accepted jobs that the copy in memory answers
    and a result to store, are answered without a task of their own (one cost the
    proxy's loop about 11 us, a done callback about 3)."""
    _, base = proxy_app
    served: list[str] = []
    serve = WorkerProcess._serve

    async def counted(self: WorkerProcess, channel: Any, call_id: int, call: Any) -> None:
        served.append(call.__qualname__)
        await serve(self, channel, call_id, call)

    monkeypatch.setattr(WorkerProcess, "_serve", counted)
    jobs = Client(http, base)
    ids = [await jobs.submit("GET", "/_api/version") for _ in range(10)]
    for job_id in ids:
        assert (await jobs.result(job_id)).status == 200
    # a job for the job API is run by the proxy, with a task: the count sees those
    assert (await jobs.result(await jobs.submit("GET", "/_api/job/done"))).status == 200
    assert "WorkerProcess._execution" in served
    assert not [name for name in served if name.endswith("finish") or "next_accepted" in name]


@pytest.mark.parametrize("when", ["at once", "at commit"])
async def test_a_bug_in_a_call_from_the_child_is_logged_and_the_job_goes_on(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    """A call that fails with anything but the store's own errors: the proxy logs it
    with its traceback (and answers the child with a RuntimeError that names it), and
    the job, still accepted, is sent again (at least once, as after any lost write)."""
    app, base = proxy_app
    store = app[STORE]
    finish = store.finish_nowait
    bugs = [TypeError("injected bug")]

    def buggy(*args: Any, **kwargs: Any) -> asyncio.Future[bool]:
        if not bugs:
            return finish(*args, **kwargs)
        if when == "at once":
            raise bugs.pop()
        failed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        failed.set_exception(bugs.pop())
        return failed

    monkeypatch.setattr(store, "finish_nowait", buggy)
    jobs = Client(http, base)
    job_id = await jobs.submit("GET", "/_api/version")
    assert (await jobs.result(job_id)).status == 200
    assert not bugs
    [failed] = [r for r in caplog.records if r.message == "a call from the worker process failed"]
    assert failed.exc_info is not None
    assert isinstance(failed.exc_info[1], TypeError)


async def test_a_bug_in_answering_a_call_at_once_leaves_the_channel_serving(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug raised while the proxy answers a call from the child without a task (the
    dispatcher's look at the jobs held in memory) is the call's failure: the child
    is not cut off and started again (every message of that read was lost with the
    connection), and the job is sent."""
    app, base = proxy_app
    store = app[STORE]
    look = store.next_accepted_now
    bugs = [TypeError("injected bug")]

    def buggy(*args: Any, **kwargs: Any) -> Any:
        if bugs:
            raise bugs.pop()
        return look(*args, **kwargs)

    monkeypatch.setattr(store, "next_accepted_now", buggy)
    jobs = Client(http, base)
    job_id = await jobs.submit("GET", "/_api/version")
    assert (await jobs.result(job_id)).status == 200
    assert not bugs
    assert app[METRICS]["worker_restarts_total"] == 0


async def test_a_job_for_the_job_api_is_run_by_the_proxy(
    proxy_app: tuple[web.Application, str], http: aiohttp.ClientSession
) -> None:
    """ArangoDB knows none of the proxy's ids: the child asks the proxy to run it."""
    _, base = proxy_app
    jobs = Client(http, base)
    first = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(first)
    deleting = await jobs.submit("DELETE", f"/_api/job/{first}")
    answer = await jobs.result(deleting)
    assert (answer.status, answer.json) == (200, {"result": True})
    assert (await jobs.call("GET", f"/_api/job/{first}")).status == 404


async def test_a_dead_worker_process_is_started_again(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(worker_process, "RESTART_MIN", 0.05)
    app = create_app(proxy_config(standin.url, tmp_path / "data", jobs={"workers": "process"}))
    jobs = Client(http, await serve_proxy(app))
    standin.queue_full = True  # accepted, not sent: waiting in the store
    waiting = [await jobs.submit("GET", "/_api/version") for _ in range(5)]
    first = child_of(app)
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: child_of(app) != first)
    standin.queue_full = False
    waiting.append(await jobs.submit("GET", "/_api/version"))
    for job_id in waiting:
        assert (await jobs.result(job_id)).json["server"] == "arango"
    assert standin.executed[("GET", "/_api/version")] == 6
    assert app[METRICS]["worker_restarts_total"] == 1
    exits = [r for r in caplog.records if "worker process" in r.getMessage()]
    assert [r.levelno for r in exits] == [logging.ERROR]
    assert f"exited with {-signal.SIGKILL}" in exits[0].getMessage()


@dataclasses.dataclass
class HeldMark:
    app: web.Application
    jobs: Client
    job_id: str
    first: int  # the child that died
    release: asyncio.Event  # lets the mark be written


async def a_child_dead_while_its_mark_is_held(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> HeldMark:
    """The child sent a job (a second's work at ArangoDB, so no first look of it finds
    it done) and asked the store to mark it submitted; it is killed while the mark is
    held back (until `release`)."""
    monkeypatch.setattr(worker_process, "RESTART_MIN", 0.05)
    app = create_app(proxy_config(standin.url, tmp_path / "data", jobs={"workers": "process"}))
    jobs = Client(http, await serve_proxy(app))
    store = app[STORE]
    release = asyncio.Event()
    marks = 0
    mark_submitted = store.mark_submitted

    async def held_mark(*args: Any) -> Any:
        nonlocal marks
        marks += 1
        await release.wait()
        return await mark_submitted(*args)

    monkeypatch.setattr(store, "mark_submitted", held_mark)
    job_id = await jobs.submit("POST", "/_api/cursor", {"query": "RETURN SLEEP(1)"})
    await eventually(lambda: marks == 1)
    first = child_of(app)
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: app[METRICS]["worker_restarts_total"] == 1)
    return HeldMark(app, jobs, job_id, first, release)


async def test_a_new_worker_process_starts_once_the_dead_ones_writes_are_done(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Had the next child read the store before the dead one's mark was written, the
    job would look accepted: sent again, and its first id at ArangoDB watched by
    nobody. So the next child starts after the mark: it watches that id, and the job
    runs once."""
    held = await a_child_dead_while_its_mark_is_held(
        standin, serve_proxy, tmp_path, http, monkeypatch
    )
    await asyncio.sleep(0.3)
    restarted = child_of(held.app) != held.first  # (not while the mark is being written)
    held.release.set()
    assert not restarted
    await eventually(lambda: child_of(held.app) != held.first)
    assert (await held.jobs.result(held.job_id)).json["result"] == [None]
    assert standin.executed[("POST", "/_api/cursor")] == 1


async def test_a_stop_while_a_dead_childs_mark_is_written_lets_it_be_written(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy stops while its keeper waits for a dead child's mark: the stop must
    not cancel that write (the job would look accepted after the next start, be sent
    again, and its first id at ArangoDB be watched by nobody)."""
    held = await a_child_dead_while_its_mark_is_held(
        standin, serve_proxy, tmp_path, http, monkeypatch
    )
    await asyncio.sleep(0.2)  # (the keeper waits for the mark)
    workers = held.app[DISPATCHER]
    assert isinstance(workers, WorkerProcess)
    stopping = asyncio.create_task(workers.stop(5.0))
    await asyncio.sleep(0.1)
    held.release.set()
    await stopping
    submitted = await held.app[STORE].submitted()
    assert [job.id for job in submitted] == [int(held.job_id)]


async def test_a_job_api_job_a_dead_child_asked_for_runs_once(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child asks the proxy to run an async fetch (PUT /_api/job/{id}) and dies
    before its result is stored: the next child finds the fetch accepted and asks
    again. A second run would find the result taken and store a 404; the second
    call waits for the first run instead."""
    monkeypatch.setattr(worker_process, "RESTART_MIN", 0.05)
    app = create_app(proxy_config(standin.url, tmp_path / "data", jobs={"workers": "process"}))
    jobs = Client(http, await serve_proxy(app))
    asked = 0
    execution = WorkerProcess._execution

    async def counted(self: WorkerProcess, *args: Any) -> None:
        nonlocal asked
        asked += 1
        await execution(self, *args)

    monkeypatch.setattr(WorkerProcess, "_execution", counted)
    taken, fetching, held = await an_async_fetch_held(app, jobs, monkeypatch)
    os.kill(child_of(app), signal.SIGKILL)
    await eventually(lambda: asked == 2)
    held.release.set()
    answer = await jobs.result(fetching)
    assert (answer.status, answer.json["server"]) == (200, "arango")
    assert held.held == 1
    assert (await jobs.call("GET", f"/_api/job/{taken}")).status == 404


async def test_a_job_api_job_asked_for_after_its_run_is_not_run_again(
    proxy_app: tuple[web.Application, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that took the job before a dead one's run of it ended asks once that run
    is over: the job is done, and runs no more (a DELETE of a job run again would
    find it gone; a DELETE /_api/job/all, forget jobs submitted since)."""
    app, base = proxy_app
    jobs = Client(http, base)
    first = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(first)
    job_id = await jobs.submit("DELETE", f"/_api/job/{first}")
    await jobs.wait_done(job_id)
    workers = app[DISPATCHER]
    assert isinstance(workers, WorkerProcess)
    runs: list[tuple[Any, ...]] = []

    async def counted(*args: Any) -> None:
        runs.append(args)

    monkeypatch.setattr(workers, "_execute", counted)
    await workers._execution(int(job_id), "DELETE", f"/_api/job/{first}", "root")
    workers._ran.clear()  # (asked long after: the store says it is done)
    await workers._execution(int(job_id), "DELETE", f"/_api/job/{first}", "root")
    assert runs == []
    answer = await jobs.result(job_id)
    assert (answer.status, answer.json) == (200, {"result": True})


async def test_a_fire_and_forget_job_for_the_job_api_runs_too(
    proxy_app: tuple[web.Application, str], http: aiohttp.ClientSession
) -> None:
    """A job for the job API sent with `x-arango-async: true` (or a store job its
    owner forgot before it ran: the same row) is invisible to the facade's reads, and
    runs all the same: the check that a child's request is for a job still accepted
    must not miss it (it did: the job stayed accepted for good, the child asking
    again at once, without end)."""
    app, base = proxy_app
    jobs = Client(http, base)
    first = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(first)
    await jobs.submit("DELETE", f"/_api/job/{first}", mode="true")
    for _ in range(500):
        if (await jobs.call("GET", f"/_api/job/{first}")).status == 404:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail(f"job {first} was never deleted: the job that deletes it never ran")
    await eventually(lambda: app[STORE].unfinished == 0)  # (its row went with its end)


async def test_kill_9_of_the_proxy_takes_the_worker_process(
    standin: StandIn, proxy_process: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    proxy = proxy_process("--upstream", standin.url)
    (child,) = proxy.children()
    assert alive(child)
    proxy.kill()  # returns once the proxy's output closed: the child held it too
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the worker process outlived the proxy"
        await asyncio.sleep(0.01)


async def test_ctrl_c_to_the_process_group_stops_both_in_order(
    standin: StandIn, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A terminal sends SIGINT to every process of the group: the child must not die
    of it (the proxy would start it again while stopping); the proxy stops it."""
    proxy = ProxyProcess.start("--upstream", standin.url, data=tmp_path / "data", new_session=True)
    try:
        jobs = Client(http, proxy.url)
        job_id = await jobs.submit("GET", "/_api/version")
        await jobs.wait_done(job_id)
        (child,) = proxy.children()
        os.killpg(proxy.proc.pid, signal.SIGINT)
        rest, _ = await asyncio.to_thread(proxy.proc.communicate, timeout=30)
    finally:
        proxy.kill()
    output = "".join(proxy.output) + rest
    assert proxy.proc.returncode == 0, output
    assert not alive(child)
    assert "Traceback" not in output
    assert "worker process" not in output  # neither died nor was killed


def test_jobs_and_responses_cross_the_socket_whole_and_as_field_tuples() -> None:
    """What the channel pickles comes back equal, and is reduced to (class, fields):
    no per-object dict of state (three times slower, see storage.records)."""
    job = Job(
        7, JobMode.STORE, JobState.SUBMITTED, "alice", "shop", "POST", "/_api/cursor?x=1",
        (("content-type", "application/json"),), "Basic YWxpY2U6cHc=", b'{"query":"1"}',
        1.5, "123", 2,
    )  # fmt: skip
    response = StoredResponse(409, (("Server", "ArangoDB"),), b'{"error":true}')
    for value in (job, response):
        assert pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)) == value
        fields = tuple(getattr(value, field.name) for field in dataclasses.fields(value))
        assert value.__reduce__() == (type(value), fields)


async def test_a_message_the_channel_cannot_send_closes_it_rather_than_vanish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every message a turn sends leaves in one frame: one that cannot be sent (a bug,
    or a frame of 4 GiB) dropped them all, and their callers waited for ever. Now the
    channel closes (the worker process exits with it, and is started again), and
    says why."""
    ours, theirs = socket.socketpair()
    lost = asyncio.Event()
    received: list[Any] = []
    loop = asyncio.get_running_loop()
    sender = Channel(received.append, lambda: None)
    receiver = Channel(received.append, lost.set)
    await loop.create_unix_connection(lambda: sender, sock=ours)
    await loop.create_unix_connection(lambda: receiver, sock=theirs)
    sender.send(("reply", 1, "fine", None))
    await eventually(lambda: received == [("reply", 1, "fine", None)])
    sender.send(("reply", 2, lambda: None, None))  # (cannot be pickled)
    await asyncio.wait_for(lost.wait(), 5)
    assert received == [("reply", 1, "fine", None)]
    [record] = [r for r in caplog.records if r.name == "proxy.channel"]
    assert record.getMessage() == "cannot send 1 message(s): closing the channel"
    receiver.close()


async def test_a_worker_process_that_dies_once_the_stop_began_is_not_started_again(
    standin: StandIn,
    serve_proxy: Callable[..., Awaitable[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child started again during the stop's grace never heard the stop (it went to
    the dead one): it took jobs and sent them, to be cut off by the drain soon
    after (sent twice, case 1). Once the stop began, a child that dies stays dead;
    the stop goes on."""
    monkeypatch.setattr(worker_process, "RESTART_MIN", 0.05)
    app = create_app(proxy_config(standin.url, tmp_path / "data", jobs={"workers": "process"}))
    await serve_proxy(app)
    workers = app[DISPATCHER]
    assert isinstance(workers, WorkerProcess)
    first = child_of(app)
    workers.stop_dispatching()
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: not alive(first))
    await asyncio.sleep(0.3)  # (6 times the restart's delay)
    assert child_of(app) == first
    assert app[METRICS]["worker_restarts_total"] == 0
    await asyncio.wait_for(workers.stop(1.0), 5)


async def test_a_result_too_large_for_the_store_is_refused_in_the_child_unsent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused where it is (ResultTooLarge: its job gets the error result that says so),
    not sent to the proxy to be refused there: a frame holds at most 4 GiB. (The bound
    made small here.)"""
    monkeypatch.setattr(core, "RESULT_MOST", 1000)
    store = worker_process.RemoteStore()  # (no channel: a call would fail otherwise)
    with pytest.raises(ResultTooLarge, match="larger than SQLite keeps in a row"):
        await store.finish(1, StoredResponse(200, (), b"x" * 1001))

"""The promise under real crashes: every 202 leads to a result.

Real processes throughout: the proxy (`python -m proxy`) and the stand-in
(`python -m tests.standin`), killed with SIGKILL or restarted mid-load. The
stand-in counts how often each insert really ran, so duplicates are seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import ProxyProcess, StandInProcess
from tests.standin.client import ROOT, Client

pytestmark = pytest.mark.timeout(120)
CHECKS_AT_ONCE = 16
FIRST_DONE_WITHIN = 10.0  # seconds the first round waits for one of its jobs to be done


@pytest.fixture
def standin_process() -> Iterator[StandInProcess]:
    proc = StandInProcess.start("--users", "root:", "--workers", "4", "--queue-size", "64")
    yield proc
    proc.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def counters(session: aiohttp.ClientSession, standin: str) -> dict[str, Any]:
    async with session.get(standin + "/_standin/counters") as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def create_collection(session: aiohttp.ClientSession, standin: str, name: str) -> None:
    async with session.post(
        standin + "/_api/collection", json={"name": name}, headers=ROOT
    ) as resp:
        assert resp.status == 200, await resp.text()


class Load:
    """Clients that keep submitting inserts with known keys; remembers every 202."""

    def __init__(self, session: aiohttp.ClientSession, collection: str) -> None:
        self.session = session
        self.collection = collection
        self.accepted: dict[str, str] = {}  # key -> job id
        self.sleepers: list[str] = []
        self.refused: list[int] = []
        self._next = 0

    async def client(self, base: str, stop: asyncio.Event, limit: int) -> None:
        jobs = Client(self.session, base)
        while not stop.is_set() and self._next < limit:
            self._next += 1
            n = self._next
            try:
                if n % 5 == 0:  # some jobs that are still running when the crash comes
                    answer = await jobs.call(
                        "POST",
                        "/_api/cursor",
                        headers={**ROOT, "x-arango-async": "store"},
                        body={"query": "RETURN SLEEP(0.2)"},
                    )
                    key = None
                else:
                    key = f"k{n}"
                    answer = await jobs.call(
                        "POST",
                        f"/_api/document/{self.collection}",
                        headers={**ROOT, "x-arango-async": "store"},
                        body={"_key": key},
                    )
            except aiohttp.ClientError:
                await asyncio.sleep(0.01)  # the proxy is down: nothing was promised
                continue
            if answer.status != 202:
                self.refused.append(answer.status)
                continue
            assert answer.async_id is not None
            if key is None:
                self.sleepers.append(answer.async_id)
            else:
                self.accepted[key] = answer.async_id

    async def run(self, base: str, stop: asyncio.Event, limit: int, clients: int = 8) -> None:
        await asyncio.gather(*(self.client(base, stop, limit) for _ in range(clients)))


async def done_now(jobs: Client, job_ids: list[str]) -> set[str]:
    """The ids whose results the proxy holds right now."""
    done = set()
    limit = asyncio.Semaphore(CHECKS_AT_ONCE)

    async def check(job_id: str) -> None:
        async with limit:
            with contextlib.suppress(aiohttp.ClientError):
                if (await jobs.call("GET", f"/_api/job/{job_id}")).status == 200:
                    done.add(job_id)

    await asyncio.gather(*(check(job_id) for job_id in job_ids))
    return done


async def check_every_job(
    session: aiohttp.ClientSession, proxy: str, standin: str, load: Load, exactly_once: set[str]
) -> None:
    jobs = Client(session, proxy)
    limit = asyncio.Semaphore(CHECKS_AT_ONCE)  # thousands of jobs: one at a time took minutes

    async def result(job_id: str) -> int:
        async with limit:
            return (await jobs.result(job_id)).status

    statuses = await asyncio.gather(*(result(job_id) for job_id in load.accepted.values()))
    for key, status in zip(load.accepted, statuses, strict=True):
        # 409: the insert ran again after a crash and found its own first run
        assert status in (201, 202, 409), (key, status)
    for status in await asyncio.gather(*(result(job_id) for job_id in load.sleepers)):
        assert status == 201
    writes = (await counters(session, standin))["writes"]
    for key, job_id in load.accepted.items():
        count = writes.get(f"_system/{load.collection}/{key}", 0)
        assert count >= 1, f"accepted insert {key} never ran"
        if job_id in exactly_once:
            assert count == 1, f"{key} finished before the crash but ran {count} times"


async def test_kill_9_while_accepting_and_running(
    tmp_path: Path,
    standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
    session: aiohttp.ClientSession,
) -> None:
    standin = standin_process.url
    await create_collection(session, standin, "c")
    data = tmp_path / "data"
    load = Load(session, "c")
    exactly_once: set[str] = set()
    rng = random.Random(7)
    for _round in range(3):
        proxy = proxy_process("--upstream", standin, data=data)
        earlier = set(load.accepted.values())
        stop = asyncio.Event()
        clients = asyncio.create_task(load.run(proxy.url, stop, limit=10_000))
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        # Jobs of this round that are done were sent to ArangoDB once: a job
        # from an earlier round may have been sent again after that crash.
        fresh = [i for i in load.accepted.values() if i not in earlier]
        done = await done_now(Client(session, proxy.url), fresh)
        # The first round goes on until one of its jobs is done: a fifth of the jobs
        # hold a stand-in worker for 0.2 s, so a few dozen finish in the first half
        # second, and fewer on a busy machine (the worker process is still starting).
        # Later rounds start behind the backlog of the ones before: none need finish.
        deadline = asyncio.get_running_loop().time() + FIRST_DONE_WITHIN
        while _round == 0 and not done and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            done = await done_now(Client(session, proxy.url), fresh)
        exactly_once |= done
        if _round < 2:
            proxy.kill()  # SIGKILL, mid-load
        else:
            assert proxy.stop() == 0  # SIGTERM mid-load: a clean stop loses nothing either
        stop.set()
        await clients
    assert len(load.accepted) > 50
    assert exactly_once, "no job finished before a crash: the test proves nothing"
    proxy = proxy_process("--upstream", standin, data=data)
    await check_every_job(session, proxy.url, standin, load, exactly_once)
    assert proxy.stop() == 0


async def test_upstream_restart_mid_load(
    tmp_path: Path,
    standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
    session: aiohttp.ClientSession,
) -> None:
    standin = standin_process.url
    await create_collection(session, standin, "r")
    proxy = proxy_process("--upstream", standin, data=tmp_path / "data")
    load = Load(session, "r")
    stop = asyncio.Event()
    clients = asyncio.create_task(load.run(proxy.url, stop, limit=300))
    await asyncio.sleep(0.3)
    async with session.post(standin + "/_standin/restart") as resp:
        assert resp.status == 200
    await clients
    assert load.refused == []
    await check_every_job(session, proxy.url, standin, load, exactly_once=set())
    assert proxy.stop() == 0


async def test_full_upstream_queue_is_invisible_to_clients(
    tmp_path: Path,
    standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
    session: aiohttp.ClientSession,
) -> None:
    standin = standin_process.url
    await create_collection(session, standin, "q")
    proxy = proxy_process("--upstream", standin, data=tmp_path / "data")
    async with session.put(standin + "/_standin/queue-full", data=b"true") as resp:
        assert resp.status == 200
    load = Load(session, "q")
    await load.run(proxy.url, asyncio.Event(), limit=100)
    assert load.refused == []
    assert len(load.accepted) + len(load.sleepers) == 100
    jobs = Client(session, proxy.url)
    still_pending = await jobs.call("GET", "/_api/job/pending?count=1000")
    assert len(still_pending.json) == 100  # ArangoDB refuses: nothing ran yet
    async with session.put(standin + "/_standin/queue-full", data=b"false") as resp:
        assert resp.status == 200
    await check_every_job(session, proxy.url, standin, load, exactly_once=set())
    assert proxy.stop() == 0

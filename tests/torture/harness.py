"""The run: real processes, a steady load, and faults at random instants.

Faults, in an order shuffled by the seed, with load running between them:

    kill      SIGKILL the proxy, start it again on the same data folder
    restart   the stand-in forgets every queued job and result (/_standin/restart)
    refuse    the stand-in answers every async request 503/21003 for a while
    outage    the stand-in is off the network longer than the dispatcher's
              longest backoff (/_standin/outage: refuses and cuts connections,
              keeps its data, so the write counts stay exact)
    disk      the proxy restarts with a small storage.max_db_size, the fetching
              client pauses until jobs are refused, then fetches again; the
              proxy must take jobs again by itself; then back to no limit

After the last fault the load goes on until some jobs sent since have come
back, free of faults (`calm_tail`). Every fault is logged with its start and
end, so a write that ran twice can be traced to the fault that overlapped its
job's life (see verdict.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import sqlite3
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.dispatcher import BACKOFF_MAX
from tests.processes import ProxyProcess, StandInProcess, free_port
from tests.standin.client import ROOT
from tests.torture.load import COLLECTION, Ledger, Target, run_load


@dataclass(frozen=True)
class Settings:
    seed: int
    kills: int
    restarts: int
    refusals: int
    outages: int
    disk_full: int
    clients: int = 6
    pause: tuple[float, float] = (0.2, 0.8)  # seconds of load between faults

    @classmethod
    def short(cls, seed: int) -> Settings:
        return cls(seed, kills=10, restarts=2, refusals=2, outages=1, disk_full=1)

    @classmethod
    def long(cls, seed: int) -> Settings:
        return cls(seed, kills=60, restarts=8, refusals=6, outages=3, disk_full=3)


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0


@dataclass
class Run:
    settings: Settings
    ledger: Ledger = field(default_factory=Ledger)
    faults: list[Fault] = field(default_factory=list)
    # (time, writes) taken right before each kill: a result fetched before it
    # must not run again after it
    snapshots: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    final_writes: dict[str, int] = field(default_factory=dict)
    repeats: dict[str, list[float]] = field(default_factory=dict)  # key: when each run ran
    disk_full_reached: int = 0
    disk_recovered: int = 0
    seconds: float = 0.0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.faults if f.kind == kind)


class Proxy:
    """The proxy as a real process whose output is drained (a full pipe would block it)."""

    def __init__(self, data: Path, upstream: str, config: Path) -> None:
        self.data, self.upstream, self.config = data, upstream, config
        self.proc: ProxyProcess | None = None
        self.reader = threading.Thread()
        self.tail: deque[str] = deque(maxlen=200)
        self.ports: set[int] = set()

    def start(self, max_db_size: int = 0) -> str:
        text = (
            "[server]\nshutdown_grace = 5\n[jobs]\nauth_cache_ttl = 120\n"
            f'[storage]\nmax_db_size = {max_db_size}\n[log]\nlevel = "info"\n'
        )
        self.config.write_text(text)
        # A new port each time: a request retried by the client library (aiohttp
        # re-sends an idempotent PUT once when a kept-alive connection drops)
        # must not reach the next process as if nothing had happened.
        port = free_port()
        while port in self.ports:
            port = free_port()
        self.ports.add(port)
        proc = ProxyProcess.start(
            "--config",
            str(self.config),
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            self.upstream,
            data=self.data,
        )
        self.proc = proc
        self.reader = threading.Thread(target=self._drain, args=(proc.proc,), daemon=True)
        self.reader.start()
        return proc.url

    def _drain(self, popen: subprocess.Popen[str]) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            self.tail.append(line)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.kill()
        self._reap()

    def stop(self) -> int:
        """SIGTERM; the exit status (0: a clean, graceful stop)."""
        assert self.proc is not None
        self.proc.proc.terminate()
        return self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        code = self.proc.proc.wait(timeout=60)
        self.reader.join()
        assert self.proc.proc.stdout is not None
        self.proc.proc.stdout.close()
        return code


def used_bytes(database: Path) -> int:
    """Bytes of the (stopped) proxy's database that hold data."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        [(size,)] = db.execute("PRAGMA page_size").fetchall()
        [(pages,)] = db.execute("PRAGMA page_count").fetchall()
        [(free,)] = db.execute("PRAGMA freelist_count").fetchall()
    return int(size) * (int(pages) - int(free))


async def control(session: aiohttp.ClientSession, method: str, url: str, data: Any = None) -> Any:
    async with session.request(method, url, data=data) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def reachable(session: aiohttp.ClientSession, standin: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            await control(session, "GET", standin + "/_standin/counters")
            return
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def unfinished(session: aiohttp.ClientSession, proxy: str) -> int:
    async with session.get(proxy + "/_proxy/metrics") as resp:
        match = re.search(r"^\S*jobs_unfinished (\d+)$", await resp.text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


async def torture(settings: Settings, folder: Path, say: Any = print) -> Run:
    run = Run(settings)
    rng = random.Random(settings.seed)
    began = time.monotonic()
    standin_proc = StandInProcess.start("--users", "root:", "--workers", "4", "--queue-size", "64")
    proxy = Proxy(folder / "data", standin_proc.url, folder / "proxy.toml")
    try:
        async with aiohttp.ClientSession() as session:
            standin = standin_proc.url
            async with session.post(
                standin + "/_api/collection", json={"name": COLLECTION}, headers=ROOT
            ) as resp:
                assert resp.status == 200
            target = Target(proxy.start())
            stop, stop_fetching, paused = asyncio.Event(), asyncio.Event(), asyncio.Event()
            pad = [0]
            load = asyncio.create_task(
                run_load(
                    session,
                    target,
                    run.ledger,
                    stop,
                    stop_fetching,
                    paused,
                    rng,
                    pad,
                    settings.clients,
                )
            )
            plan = (
                ["kill"] * settings.kills
                + ["restart"] * settings.restarts
                + ["refuse"] * settings.refusals
                + ["outage"] * settings.outages
                + ["disk"] * settings.disk_full
            )
            rng.shuffle(plan)
            for step, kind in enumerate(plan, 1):
                await asyncio.sleep(rng.uniform(*settings.pause))
                fault = Fault(kind, time.monotonic())
                run.faults.append(fault)
                if kind == "kill":
                    await snapshot(run, session, standin)
                    fault.start = time.monotonic()
                    proxy.kill()
                    target.url = proxy.start()
                elif kind == "restart":
                    await control(session, "POST", standin + "/_standin/restart")
                elif kind == "refuse":
                    await control(session, "PUT", standin + "/_standin/queue-full", b"true")
                    await asyncio.sleep(rng.uniform(0.5, 1.5))
                    await control(session, "PUT", standin + "/_standin/queue-full", b"false")
                elif kind == "outage":
                    seconds = BACKOFF_MAX + 1
                    await control(session, "POST", f"{standin}/_standin/outage?seconds={seconds}")
                    await asyncio.sleep(seconds)
                    await reachable(session, standin)
                else:
                    await disk_full_phase(run, session, proxy, target, standin, paused, pad)
                fault.end = time.monotonic()
                say(
                    f"  {step:3d}/{len(plan)} {kind:8s} {fault.end - fault.start:5.1f} s, "
                    f"{len(run.ledger.accepted())} accepted so far"
                )
            await calm_tail(run)
            stop.set()
            # Every promised job must come through now that the faults are over.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if not run.ledger.to_fetch and await unfinished(session, target.url) == 0:
                    break
                await asyncio.sleep(0.2)
            stop_fetching.set()
            await load
            counters = await control(session, "GET", standin + "/_standin/counters")
            run.final_writes = counters["writes"]
            run.repeats = {k.rsplit("/", 1)[1]: t for k, t in counters["repeats"].items()}
            assert proxy.stop() == 0, "".join(proxy.tail)
    finally:
        with contextlib.suppress(Exception):
            proxy.kill()
        standin_proc.kill()
    run.seconds = time.monotonic() - began
    return run


async def calm_tail(run: Run, jobs: int = 50, seconds: float = 30) -> None:
    """Keep the load on after the last fault until `jobs` store jobs sent since then
    have come back (at most `seconds`): verdict.py can check that those ran exactly
    once. Under a slow machine's backlog, every job of the faulty part may span a
    fault."""
    calm = time.monotonic()
    deadline = calm + seconds
    while time.monotonic() < deadline:
        done = (a for a in run.ledger.accepted("store") if a.sent > calm and a.fetched)
        if sum(1 for _ in done) >= jobs:
            return
        await asyncio.sleep(0.1)


async def snapshot(run: Run, session: aiohttp.ClientSession, standin: str) -> None:
    """Write counts of the results fetched since the last snapshot (verdict.py uses
    each fetched result's first snapshot after its fetch)."""
    since = run.snapshots[-1][0] if run.snapshots else 0.0
    now = time.monotonic()  # fetched before the counters were asked: ran for the last time
    writes = (await control(session, "GET", standin + "/_standin/counters"))["writes"]
    keys = {
        f"_system/{COLLECTION}/{a.key}"
        for a in run.ledger.accepted("store")
        if a.fetched is not None and a.result is not None and since < a.fetched <= now
    }
    run.snapshots.append((now, {k: n for k, n in writes.items() if k in keys}))


async def disk_full_phase(
    run: Run,
    session: aiohttp.ClientSession,
    proxy: Proxy,
    target: Target,
    standin: str,
    paused: asyncio.Event,
    pad: list[int],
) -> None:
    """Fill a small limit until jobs are refused, then make room by fetching."""
    assert proxy.stop() == 0, "".join(proxy.tail)  # a graceful stop, under load
    # 256 KiB for new jobs above what the store holds now (a quarter is reserve)
    limit = (used_bytes(proxy.data / "jobs.sqlite3") + 256 * 1024) * 4 // 3
    target.url = proxy.start(max_db_size=limit)
    paused.set()
    pad[0] = 2000
    await control(session, "PUT", standin + "/_standin/queue-full", b"true")
    refused = sum(n for (status, num), n in run.ledger.refusals.items() if num == 21003)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = sum(n for (status, num), n in run.ledger.refusals.items() if num == 21003)
        if now - refused >= 20:
            run.disk_full_reached += 1
            break
        await asyncio.sleep(0.05)
    await control(session, "PUT", standin + "/_standin/queue-full", b"false")
    paused.clear()
    pad[0] = 0
    # Room comes back as jobs finish and results are fetched: a 202 again, same process.
    # A backlog of unfinished jobs (after outages, on a slow machine: 41,000 once) takes
    # room as it drains, its results being stored before they are fetched: waited for
    # while it shrinks (that time it took 46 s).
    accepted = len(run.ledger.accepted())
    deadline = time.monotonic() + 30
    backlog: int | None = None
    while time.monotonic() < deadline:
        if len(run.ledger.accepted()) > accepted + 20:
            run.disk_recovered += 1
            break
        await asyncio.sleep(0.5)
        try:
            left = await asyncio.wait_for(unfinished(session, target.url), 5)
        except (aiohttp.ClientError, TimeoutError):
            left = None
        if backlog is not None and left is not None and left < backlog:
            deadline = max(deadline, time.monotonic() + 30)
        backlog = left
    proxy.kill()
    target.url = proxy.start()

"""What the benchmarks share: real processes on loopback and the load generators.

Every figure is printed next to a baseline measured in the same run, because
these machines are noisy; the ratio is what to compare between runs. The load
comes from `wrk` when it is installed (C, so it leaves the cores to the
servers being measured) and from an aiohttp closed loop otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config import WORKERS  # noqa: E402
from tests.processes import ProxyProcess, ServerProcess, StandInProcess, free_port  # noqa: E402


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50: float
    p99: float
    tool: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @classmethod
    def of(cls, latencies: list[float], seconds: float, tool: str = "aiohttp") -> Load:
        ordered = sorted(latencies)

        def at(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

        return cls(len(ordered), seconds, at(50), at(99), tool)

    def row(self, name: str) -> str:
        return (
            f"{name:<28} {self.rate:>10.0f}/s   p50 {self.p50 * 1000:7.2f} ms"
            f"   p99 {self.p99 * 1000:7.2f} ms   ({self.tool})"
        )


async def closed_loop(
    call: Callable[[aiohttp.ClientSession], Awaitable[None]],
    *,
    clients: int,
    seconds: float,
) -> Load:
    """`clients` workers call `call` back to back for `seconds`; latency of each call."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await call(session)
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return Load.of(latencies, elapsed)


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match[1]) * _UNITS[match[2]]


def run_wrk(*args: str) -> str | None:
    """wrk's report for `args`, or None when wrk is not installed. Any answer other
    than 2xx or 3xx fails the benchmark."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", *args], capture_output=True, text=True, check=True).stdout
    assert "Non-2xx or 3xx responses" not in out, f"wrk saw failed requests:\n{out}"
    return out


def wrk(
    url: str, *, method: str, headers: dict[str, str], clients: int, seconds: float
) -> Load | None:
    """Load from wrk, or None when wrk is not installed."""
    script = f'wrk.method = "{method}"\n' + "".join(
        f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers.items()
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = run_wrk("-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--latency", "-s", lua.name, url)
    if out is None:
        return None
    requests = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s)", out)
    # at a line's start: the stats table above has percentages too ("+/- Stdev 68.50%")
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE)
    assert requests, out
    assert p50, out
    assert p99, out
    elapsed = _seconds(requests[2] + requests[3])
    return Load(int(requests[1]), elapsed, _seconds(p50[1]), _seconds(p99[1]), "wrk")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat: Path) -> float:
    """User + system CPU of a process (all its threads) or a thread, from its /proc stat
    file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds spent during a load, by part: the proxy's loop (its main thread),
    its SQLite threads (writer, reader), its worker process, the stand-in, and the
    load generator (this process, and wrk as its child). Read from /proc (Linux).

    What it is for: on two cores every part takes from the others, so the figure
    that explains a rate is the CPU per job of each part (README, Benchmarks)."""

    def __init__(self, proxy: ProxyProcess, standin: ServerProcess) -> None:
        self._proxy = proxy.proc.pid
        self._standin = standin.proc.pid
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        proxy = Path(f"/proc/{self._proxy}")
        threads = {int(t.name): cpu_seconds(t / "stat") for t in (proxy / "task").iterdir()}
        loop = threads.pop(self._proxy)
        children = (proxy / "task" / str(self._proxy) / "children").read_text().split()
        mine, waited = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return {
            "proxy loop": loop,
            "proxy SQLite threads": sum(threads.values()),
            "worker process": sum(cpu_seconds(Path(f"/proc/{c}/stat")) for c in children),
            "stand-in": cpu_seconds(Path(f"/proc/{self._standin}/stat")),
            "load generator": mine.ru_utime + mine.ru_stime + waited.ru_utime + waited.ru_stime,
        }

    def start(self) -> None:
        self._start = self._read()

    def used(self) -> dict[str, float]:
        """Since start(): each part's CPU seconds."""
        return {name: cpu - self._start[name] for name, cpu in self._read().items()}

    def per_job(self, jobs: int, seconds: float) -> str:
        """Since start(): each part's CPU per job (us) and share of a core (%)."""
        parts = [
            f"{name} {used / jobs * 1e6:.0f} us ({used / seconds * 100:.0f} %)"
            for name, used in self.used().items()
        ]
        return "CPU per job (share of one core): " + ", ".join(parts)


def start_proxy(
    upstream: str, folder: Path, workers: str = "process", code: Path | None = None
) -> ProxyProcess:
    """The proxy's command on `folder`, with dispatcher and harvester where `workers` says
    (jobs.workers: "process" or "inline"); `code`: another tree of its code to run. The
    benchmarks measure rates, not the durable capacity: a fast machine piles up more
    than the default 100,000 unfinished jobs in bench/accept.py's run with ArangoDB
    stopped, so the capacity is raised out of reach."""
    config = folder / "proxy.toml"
    config.write_text(f'[jobs]\nworkers = "{workers}"\ncapacity = 10_000_000\n')
    listen = f"127.0.0.1:{free_port()}"
    args = ("--config", str(config), "--listen", listen, "--upstream", upstream)
    return ProxyProcess.start(*args, data=folder / "data", code=code)


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """--workers: where the proxy under test runs dispatcher and harvester."""
    parser.add_argument(
        "--workers",
        choices=WORKERS,
        default=WORKERS[0],
        help="where the proxy runs dispatcher and harvester (jobs.workers)",
    )


async def load(
    url: str,
    *,
    method: str,
    headers: dict[str, str],
    expect: int,
    clients: int,
    seconds: float,
    meter: CpuMeter | None = None,
) -> Load:
    """The same fixed request from `clients` connections for `seconds`, after a warm-up
    (`meter` starts after it)."""
    measured = wrk(url, method=method, headers=headers, clients=clients, seconds=1)
    if measured is not None:
        if meter is not None:
            meter.start()
        measured = wrk(url, method=method, headers=headers, clients=clients, seconds=seconds)
        assert measured is not None
        return measured

    async def call(session: aiohttp.ClientSession) -> None:
        async with session.request(method, url, headers=headers) as resp:
            await resp.read()
            assert resp.status == expect, resp.status

    await closed_loop(call, clients=clients, seconds=1.0)
    if meter is not None:
        meter.start()
    return await closed_loop(call, clients=clients, seconds=seconds)


__all__ = [
    "CpuMeter",
    "Load",
    "ProxyProcess",
    "ServerProcess",
    "StandInProcess",
    "add_workers_option",
    "closed_loop",
    "cpu_seconds",
    "free_port",
    "load",
    "run_wrk",
    "start_proxy",
    "wrk",
]

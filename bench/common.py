"""What the benchmarks share: real processes on loopback and a closed-loop load generator.

Every figure is printed next to a baseline measured in the same run, because
these machines are noisy; the ratio is what to compare between runs.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import ProxyProcess, StandInProcess  # noqa: E402


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def row(self, name: str) -> str:
        return (
            f"{name:<28} {self.rate:>10.0f}/s   p50 {self.percentile(50) * 1000:7.2f} ms"
            f"   p99 {self.percentile(99) * 1000:7.2f} ms"
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
    return Load(len(latencies), elapsed, latencies)


def median(values: list[float]) -> float:
    return statistics.median(values)


__all__ = ["Load", "ProxyProcess", "StandInProcess", "closed_loop", "median"]

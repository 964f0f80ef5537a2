"""Durable accepts: how fast the proxy answers 202 with every job fsync'd.

    python bench/accept.py [--clients 64] [--seconds 5] [--rounds 3] [--workers process|inline]

Baselines, measured in the same run: the disk's own rate of single-row SQLite
commits (WAL, synchronous=FULL), i.e. what one-commit-per-request would give;
and a bare aiohttp server whose handler only answers 202 (bench/bare.py), the
most any aiohttp process serves on this machine. The proxy runs for real with
dispatcher and harvester busy behind it (the stand-in executes every job), and
synchronous=FULL.

Then the same load once more with the stand-in stopped (SIGSTOP): ArangoDB
unresponsive, the dispatcher waiting on it, the proxy accepting on its own. That is
the rate at which the proxy absorbs a burst while ArangoDB is busy or away, and,
with nothing else on the cores, its own ceiling (the first figure also pays for the
stand-in and the worker process running every job on the same two cores).

These machines swing by a fifth and more from one measurement to the next (the
same code gave 0.97 and 1.59 minutes apart), so the disk's rate and the proxy's
are measured in `--rounds` (3) rounds, one after the other in each round, each
round on a new data folder with a new proxy and stand-in; one line per round,
then the round with the median ratio in full.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    CpuMeter,
    Load,
    ServerProcess,
    StandInProcess,
    add_workers_option,
    free_port,
    load,
    start_proxy,
)


def single_commit_rate(folder: Path, seconds: float) -> float:
    """Commits/s of one row per transaction, fsync'd: the disk's own limit."""
    db = sqlite3.connect(folder / "fsync.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    payload = b"x" * 200
    commits = 0
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline:
        db.execute("BEGIN")
        db.execute("INSERT INTO t (body) VALUES (?)", (payload,))
        db.execute("COMMIT")
        commits += 1
    elapsed = time.perf_counter() - began
    db.close()
    return commits / elapsed


async def accepts(url: str, clients: int, seconds: float, meter: CpuMeter | None = None) -> Load:
    return await load(
        url + "/_api/version",
        method="PUT",
        headers={"x-arango-async": "store"},
        expect=202,
        clients=clients,
        seconds=seconds,
        meter=meter,
    )


@dataclass(frozen=True)
class Round:
    fsync_rate: float  # the disk's single-commit rate, commits/s
    durable: Load  # accepts with dispatcher and harvester busy
    cpu: str
    alone: Load  # accepts with the stand-in stopped
    cpu_alone: str

    @property
    def ratio(self) -> float:
        return self.durable.rate / self.fsync_rate

    @property
    def ratio_alone(self) -> float:
        return self.alone.rate / self.fsync_rate


async def one_round(folder: Path, args: argparse.Namespace) -> Round:
    """The disk's rate, then the proxy's, on a new data folder."""
    fsync_rate = single_commit_rate(folder, args.seconds)
    standin = StandInProcess.start("--no-auth", "--workers", "4", "--queue-size", "4096")
    proxy = start_proxy(standin.url, folder, args.workers)
    meter = CpuMeter(proxy, standin)
    try:
        durable = await accepts(proxy.url, args.clients, args.seconds, meter)
        cpu = meter.per_job(durable.requests, durable.seconds)
        os.kill(standin.proc.pid, signal.SIGSTOP)
        try:
            alone = await accepts(proxy.url, args.clients, args.seconds, meter)
            cpu_alone = meter.per_job(alone.requests, alone.seconds)
        finally:
            os.kill(standin.proc.pid, signal.SIGCONT)
    finally:
        proxy.stop()
        standin.stop()
    return Round(fsync_rate, durable, cpu, alone, cpu_alone)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    add_workers_option(parser)
    args = parser.parse_args()
    bare_server = ServerProcess.run(
        [sys.executable, str(Path(__file__).with_name("bare.py")), str(free_port())]
    )
    try:
        bare = await accepts(bare_server.url, args.clients, args.seconds)
    finally:
        bare_server.stop()
    print(
        f"durable accepts (synchronous=FULL), {args.clients} concurrent clients, "
        f"jobs.workers = {args.workers}"
    )
    rounds = []
    for number in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            measured = await one_round(Path(tmp), args)
        print(
            f"  round {number}: disk {measured.fsync_rate:.0f} commits/s, "
            f"accepts {measured.durable.rate:.0f}/s (ratio {measured.ratio:.2f}), "
            f"ArangoDB stopped {measured.alone.rate:.0f}/s (ratio {measured.ratio_alone:.2f})",
            flush=True,
        )
        rounds.append(measured)
    median = sorted(rounds, key=lambda one: one.ratio)[len(rounds) // 2]
    alone = sorted(rounds, key=lambda one: one.ratio_alone)[len(rounds) // 2]
    print("the round with the median ratio:")
    print(f"{'disk single-commit rate':<28} {median.fsync_rate:>10.0f}/s")
    print(bare.row("bare aiohttp 202 handler"))
    print(median.durable.row("proxy accepts (202)"))
    print(f"ratio accepts / single-commit rate: {median.ratio:.2f}")
    print(f"ratio bare aiohttp / single-commit rate (ceiling): {bare.rate / median.fsync_rate:.2f}")
    print(f"ratio accepts / bare aiohttp: {median.durable.rate / bare.rate:.2f}")
    print(median.cpu)
    print("the round with the median ratio, ArangoDB stopped:")
    print(f"{'disk single-commit rate':<28} {alone.fsync_rate:>10.0f}/s")
    print(alone.alone.row("accepts, ArangoDB stopped"))
    print(f"ratio accepts (ArangoDB stopped) / single-commit rate: {alone.ratio_alone:.2f}")
    print(alone.cpu_alone)


if __name__ == "__main__":
    asyncio.run(main())

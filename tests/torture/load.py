"""The load: clients that submit countable writes, a client that fetches results.

Every attempt is written down with the time it was sent and what came back:
a 202 (the proxy promised), a refusal (any other status: nothing promised, and
the write must never run), or no answer at all (connection error: unknown, the
write may or may not run). Keys are unique per attempt, so the stand-in's write
counter tells how often each attempt really ran.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import aiohttp

from tests.standin.client import ROOT, Client

COLLECTION = "torture"
FETCHERS = 4


@dataclass
class Attempt:
    key: str
    mode: str  # "store" or "true"
    sent: float
    outcome: str = "unknown"  # "accepted", "refused" or "unknown"
    job_id: str | None = None
    refusal: tuple[int, int] | None = None  # (status, errorNum)
    fetched: float | None = None  # when its result came back
    result: int | None = None  # the result's status
    fetch_unknown: bool = False  # a fetch got no answer: it may have taken the result
    lost: bool = False  # 404 for a job whose result nobody took


@dataclass
class Ledger:
    attempts: dict[str, Attempt] = field(default_factory=dict)
    refusals: Counter[tuple[int, int]] = field(default_factory=Counter)
    to_fetch: deque[Attempt] = field(default_factory=deque)
    next_key: int = 0

    def new(self, mode: str) -> Attempt:
        self.next_key += 1
        attempt = Attempt(f"{mode[0]}{self.next_key}", mode, time.monotonic())
        self.attempts[attempt.key] = attempt
        return attempt

    def accepted(self, mode: str | None = None) -> list[Attempt]:
        return [
            a
            for a in self.attempts.values()
            if a.outcome == "accepted" and (mode is None or a.mode == mode)
        ]


class Target:
    """Where the proxy is now (it moves to a new port on every restart)."""

    def __init__(self, url: str) -> None:
        self.url = url


async def client(
    session: aiohttp.ClientSession,
    target: Target,
    ledger: Ledger,
    stop: asyncio.Event,
    rng: random.Random,
    pad: list[int],
) -> None:
    while not stop.is_set():
        mode = "store" if rng.random() < 0.75 else "true"
        attempt = ledger.new(mode)
        body: dict[str, object] = {"_key": attempt.key}
        if pad[0]:
            body["pad"] = "p" * pad[0]
        try:
            answer = await Client(session, target.url).call(
                "POST",
                f"/_api/document/{COLLECTION}",
                body,
                headers={"x-arango-async": mode},
            )
        except (TimeoutError, aiohttp.ClientError):
            await asyncio.sleep(0.02)  # the proxy is down; the outcome stays unknown
            continue
        if answer.status == 202:
            attempt.outcome = "accepted"
            attempt.job_id = answer.async_id
            if mode == "store":
                assert attempt.job_id is not None, answer
                ledger.to_fetch.append(attempt)
        else:
            attempt.outcome = "refused"
            error_num = answer.json.get("errorNum", 0) if answer.body else 0
            attempt.refusal = (answer.status, error_num)
            ledger.refusals[attempt.refusal] += 1
            await asyncio.sleep(0.01)


async def fetcher(
    session: aiohttp.ClientSession,
    target: Target,
    ledger: Ledger,
    stop: asyncio.Event,
    paused: asyncio.Event,
) -> None:
    """Fetch results as a client would: oldest first, a pending one goes to the back."""
    while not stop.is_set():
        if paused.is_set() or not ledger.to_fetch:
            await asyncio.sleep(0.02)
            continue
        attempt = ledger.to_fetch.popleft()
        try:
            answer = await Client(session, target.url).call(
                "PUT", f"/_api/job/{attempt.job_id}", user=ROOT
            )
        except (TimeoutError, aiohttp.ClientError):
            attempt.fetch_unknown = True
            ledger.to_fetch.append(attempt)
            await asyncio.sleep(0.02)
            continue
        if answer.async_id is not None:
            attempt.fetched = time.monotonic()
            attempt.result = answer.status
        elif answer.status == 404:
            attempt.fetched = time.monotonic()
            attempt.lost = not attempt.fetch_unknown
        else:  # 204 pending, 503 store busy or full
            ledger.to_fetch.append(attempt)
            if len(ledger.to_fetch) < 50:
                await asyncio.sleep(0.005)


async def run_load(
    session: aiohttp.ClientSession,
    target: Target,
    ledger: Ledger,
    stop: asyncio.Event,
    stop_fetching: asyncio.Event,
    paused: asyncio.Event,
    rng: random.Random,
    pad: list[int],
    clients: int,
) -> None:
    await asyncio.gather(
        *(fetcher(session, target, ledger, stop_fetching, paused) for _ in range(FETCHERS)),
        *(
            client(session, target, ledger, stop, random.Random(rng.random()), pad)
            for _ in range(clients)
        ),
    )

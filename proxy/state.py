"""Typed application keys: what the application holds for its handlers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Collection
from typing import Protocol

from aiohttp import web

from proxy.auth import Verifier
from proxy.config import Config
from proxy.cors import Origins
from proxy.tokens import JobCredentials
from proxy.upstream import Upstream
from storage import Job, JobState, JobStore, Mark, StoredResponse


class Waker(Protocol):
    """What the intake needs of the dispatcher: a nudge that work is waiting."""

    def wake(self) -> None: ...


class JobQueue(Protocol):
    """What the dispatcher and harvester need of the job store: `storage.JobStore`
    itself, or `proxy.worker_process.RemoteStore` when they run in a process of
    their own (the methods are JobStore's)."""

    async def next_accepted(
        self, limit: int, exclude: Collection[int] = (), unsent: Collection[int] = ()
    ) -> list[Job]: ...

    async def submitted(self) -> list[Job]: ...

    async def mark_submitted(self, job_id: int, upstream_id: str) -> Mark: ...

    async def requeue(self, job_id: int, upstream_id: str) -> bool: ...

    async def finish(
        self,
        job_id: int,
        response: StoredResponse,
        *,
        from_states: Collection[JobState] = ...,
        upstream_id: str | None = ...,
    ) -> bool: ...


class ShutdownClock:
    """The grace of a graceful stop, counted from when aiohttp stops accepting."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._deadline: float | None = None
        self.on_begin: list[Callable[[], None]] = []

    def begin(self) -> None:
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self.grace
            for callback in self.on_begin:
                callback()

    def remaining(self) -> float:
        if self._deadline is None:
            return self.grace
        return max(0.0, self._deadline - asyncio.get_running_loop().time())


CONFIG = web.AppKey("config", Config)
UPSTREAM = web.AppKey("upstream", Upstream)
STORE = web.AppKey("store", JobStore)
VERIFIER = web.AppKey("verifier", Verifier)
ORIGINS = web.AppKey("origins", Origins)
DISPATCHER = web.AppKey("dispatcher", Waker)
# what the proxy sends to ArangoDB on a job's behalf (proxy.tokens)
CREDENTIALS = web.AppKey("credentials", JobCredentials)
# counters by name (proxy.ops.COUNTERS lists them); a plain Counter keeps
# dispatcher and harvester free of any metrics library
METRICS = web.AppKey("metrics", Counter[str])
SHUTDOWN = web.AppKey("shutdown", ShutdownClock)

"""The dispatcher and harvester as one unit: started together, stopped in order.

The same unit runs in the proxy's own process (``jobs.workers = "inline"``) or
in the worker process (`proxy.worker_process`, the default). Stopping, within a
grace: no new submissions; submissions under way finish, so none is sent twice;
the harvester ends its tick, storing the results it fetched. Jobs still at
ArangoDB stay ``submitted`` and are harvested after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from proxy.config import JobsConfig
from proxy.dispatcher import Dispatcher, JobApi
from proxy.harvester import Harvester
from proxy.state import JobQueue
from proxy.tokens import JobCredentials
from proxy.upstream import Upstream


class Workers:
    def __init__(
        self,
        store: JobQueue,
        upstream: Upstream,
        credentials: JobCredentials,
        *,
        execute: JobApi,
        jobs: JobsConfig,
        metrics: Counter[str],
    ) -> None:
        self._harvester = Harvester(
            store,
            upstream,
            credentials,
            policy=jobs.lost_job_policy,
            wake_dispatcher=self.wake,
            metrics=metrics,
        )
        self._dispatcher = Dispatcher(
            store,
            upstream,
            credentials,
            self._harvester,
            execute=execute,
            max_inflight=jobs.max_inflight,
            metrics=metrics,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Resume every stored job: those at ArangoDB are watched, the others sent."""
        await self._harvester.load()
        self._tasks = [
            asyncio.create_task(self._dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self._harvester.run(), name="harvester"),
        ]

    def wake(self) -> None:
        """Jobs are waiting to be sent."""
        self._dispatcher.wake()

    def stop_dispatching(self) -> None:
        """Send no more jobs (a stop has begun); submissions under way go on."""
        self._tasks[0].cancel()

    async def stop(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        dispatching, harvesting = self._tasks
        dispatching.cancel()
        await self._dispatcher.drain(grace)
        self._harvester.stop()
        await asyncio.wait([harvesting], timeout=max(0.0, deadline - loop.time()))
        harvesting.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

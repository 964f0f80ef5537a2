"""The bounded FIFO and the worker tasks that run queued (async) requests.

Stands in for ArangoDB's `SupervisedScheduler`: `workers` tasks take jobs in
order from a queue of at most `queue_size` waiting jobs. A job cancelled
before a worker picks it up is not run; its stored result is 410/21.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from tests.standin.call import Call
from tests.standin.jobs import Job, JobManager
from tests.standin.reply import CANCELED, Reply

Runner = Callable[[Call], Awaitable[Reply]]


class Scheduler:
    def __init__(self, run: Runner, jobs: JobManager, workers: int, queue_size: int) -> None:
        self.run = run
        self.jobs = jobs
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        # seconds the most recently dequeued job waited: x-arango-queue-time-seconds
        self.last_wait = 0.0
        self.tasks = [asyncio.create_task(self._work()) for _ in range(workers)]

    def offer(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            return False
        return True

    def full(self) -> bool:
        return self.queue.full()

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            self.last_wait = time.monotonic() - job.queued_at
            reply = CANCELED if job.canceled else await self.run(job.call)
            if job.job_id:
                self.jobs.finish(job.job_id, reply)

    async def close(self) -> None:
        """Stop at once, as a crash would: queued and running work is lost."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

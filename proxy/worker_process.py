"""The dispatcher and harvester in a process of their own (``jobs.workers = "process"``).

Why: the proxy is bound by Python's one interpreter lock, not by the CPU. In
one process, dispatching and harvesting the jobs just accepted took about half
the time that accepting needs (bench/accept.py: ~6,500 accepts/s with them
running, ~14,000 without). In a child process, with its own interpreter and
its own connections to ArangoDB, they run beside the requests instead of
taking turns with them.

What stays in the proxy: the job store (its one writer, group commit, the jobs
held in memory), the intake and the facade. The child reaches the store by
calls over a socket pair: `RemoteStore` has the methods of `JobQueue`, each one
message out and one reply back, pickled (both ends are this program)::

    child -> proxy   ("call", id, name, args, kwargs)  a JobQueue method, or
                                                       "execute" (a job-API job)
                     ("count", {name: n})             metrics counted since the last
    proxy -> child   ("start", config, credentials)   the first message
                     ("reply", id, value, error)
                     ("wake",)                        jobs are waiting (sent once,
                                                      until the child looks again)
                     ("stop",)                        a stop began: send no new jobs
                     ("drain", grace)                 finish what is under way, exit

Lifetimes. The child exits as soon as its socket closes, so a kill -9 of the
proxy takes it along (the kernel closes the proxy's end; nothing else holds
it). It ignores SIGINT and SIGTERM, which a terminal or a service manager
sends to the whole process group: the proxy stops it in order. A child that
dies is started again, after RESTART_MIN seconds, doubling up to RESTART_MAX
while it keeps dying young. What it was doing is in the store; a job it had
sent without recording ArangoDB's id is sent again, as after a kill -9 of the
proxy (README, Guarantees).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Collection
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from proxy import jobs_api
from proxy.channel import Channel
from proxy.config import Config
from proxy.state import CONFIG, CREDENTIALS, METRICS, STORE
from proxy.tokens import JobCredentials
from proxy.upstream import Upstream
from proxy.workers import Workers
from storage import Job, JobState, Mark, ResultTooLarge, StoredResponse, StoreError
from storage.core import too_large_for_a_row
from storage.records import UNFINISHED
from storage.store import UNKNOWN

log = logging.getLogger(__name__)

RESTART_MIN = 0.5
RESTART_MAX = 10.0
YOUNG = 10.0  # a child that dies within this many seconds is restarted ever more slowly
EXIT_SLACK = 2.0  # beyond the grace, for the child to close its connections and exit
COUNT_EVERY = 0.1  # seconds between the child's metrics messages
RAN_KEPT = 1024  # job-API jobs run here whose ids are kept (a child asks within moments)
_STORE_CALLS = frozenset({"submitted", "mark_submitted", "requeue", "finish"})


# -- the proxy's side ------------------------------------------------------------------


class WorkerProcess:
    """Starts the child, serves it the store, starts it again when it dies."""

    def __init__(self, app: web.Application) -> None:
        self._config = app[CONFIG]
        self._credentials = app[CREDENTIALS]
        self._metrics = app[METRICS]
        self._store = app[STORE]
        self._execute = functools.partial(jobs_api.execute, app)
        self._channel = Channel(self._received, lambda: None)
        self._process: asyncio.subprocess.Process | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = False
        self._serving: set[asyncio.Task[None]] = set()
        self._executing: dict[int, asyncio.Task[None]] = {}  # job-API jobs run here, by id
        self._answering: set[asyncio.Task[None]] = set()  # the children's calls for those
        self._ran: dict[int, None] = {}  # the latest of those that ended, oldest first
        self._writing: set[asyncio.Future[Any]] = set()  # finish calls, until committed
        self._woken = False  # a wake is on its way and the child has not looked since

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        """Start the child; an OSError here (no process can be started) stops the proxy."""
        await self._spawn()
        self._keeper = asyncio.create_task(self._keep_running(), name="worker-process")

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            self._channel.send(("wake",))

    def stop_dispatching(self) -> None:
        self._stopping = True  # (a child that dies from now on is not started again)
        self._channel.send(("stop",))

    async def stop(self, grace: float) -> None:
        """The child finishes what it has under way (within `grace`), then exits."""
        if self._keeper is not None:
            self._keeper.cancel()
        process = self._process
        assert process is not None
        self._channel.send(("drain", grace))
        try:
            async with asyncio.timeout(grace + EXIT_SLACK):
                await process.wait()
        except TimeoutError:
            log.warning("the worker process did not stop in time; killing it")
            process.kill()
            await process.wait()
        # Job-API jobs still running had the grace too: they stay accepted and run
        # again at the next start (a result one took is still in the store for that).
        for run in self._executing.values():
            run.cancel()
        # what it asked for last is written before the store closes
        await self._settle(self._serving | self._answering | set(self._executing.values()))
        self._channel.close()

    async def _settle(self, calls: set[asyncio.Task[None]]) -> None:
        """Until `calls` of the child that ended, and its writes, are done. (`wait`,
        not `gather`: a stop that cancels the keeper meanwhile must not cancel them.)"""
        pending = calls | self._writing
        if pending:
            await asyncio.wait(pending)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=_child_environment(),
            )
        self._channel = Channel(self._received, lambda: None)
        await asyncio.get_running_loop().create_unix_connection(lambda: self._channel, sock=ours)
        self._woken = False
        self._channel.send(("start", self._config, self._credentials))

    async def _keep_running(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_MIN
        while True:
            assert self._process is not None
            started = loop.time()
            code = await self._process.wait()
            self._channel.close()
            if self._stopping:
                log.warning("the worker process exited with %s while the proxy stops", code)
                return
            self._metrics["worker_restarts_total"] += 1
            delay = RESTART_MIN if loop.time() - started > YOUNG else delay
            log.error(
                "the worker process (dispatcher, harvester) exited with %s; "
                "starting it again in %.1f s",
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX, delay * 2)
            # The new child reads the store as the dead one left it: a job it sent
            # whose mark is still being written would look accepted, be sent again,
            # and its first id be watched by nobody. (Not for the job-API jobs run here
            # for it, which may wait on ArangoDB for long: the next child finds them
            # accepted, and its calls for them wait for the same runs, `_execution`.)
            await self._settle(self._serving)
            while True:
                try:
                    await self._spawn()
                    break
                except OSError as exc:
                    log.error("cannot start the worker process, trying again: %s", exc)  # noqa: TRY400
                    await asyncio.sleep(RESTART_MAX)

    def _received(self, message: tuple[Any, ...]) -> None:
        if message[0] == "count":
            self._metrics.update(message[1])
            return
        _, call_id, name, args, kwargs = message
        channel = self._channel  # the reply goes to the child that asked, never to a later one
        try:
            self._answer(channel, call_id, name, args, kwargs)
        except Exception as exc:  # (a bug: answered as one, the channel serves on)
            channel.send(_failed(call_id, exc))

    def _answer(
        self, channel: Channel, call_id: int, name: str, args: Any, kwargs: dict[str, Any]
    ) -> None:
        call: Awaitable[Any]
        if name == "next_accepted":
            self._woken = False  # before the look: a job accepted after it wakes the child
            jobs = self._store.next_accepted_now(*args)
            if jobs is not UNKNOWN:
                channel.send(("reply", call_id, jobs, None))
                return
            call = self._store.next_accepted(*args)
        elif name == "finish":
            # The commonest call (a result per job): answered from the write's future,
            # without a task of its own. (ResultTooLarge, raised here, goes back as is.)
            written = self._store.finish_nowait(*args, **kwargs)
            self._writing.add(written)
            written.add_done_callback(functools.partial(self._written, channel, call_id))
            return
        elif name == "execute":
            call = self._execution(*args)
        else:
            assert name in _STORE_CALLS, name
            call = getattr(self._store, name)(*args, **kwargs)
        task = asyncio.create_task(self._serve(channel, call_id, call))
        calls = self._answering if name == "execute" else self._serving
        calls.add(task)
        task.add_done_callback(calls.discard)

    async def _execution(self, job_id: int, *args: str) -> None:
        """A job-API job, run here once however many children ask: one that died
        asked first, and the next found the job still accepted, and may ask after that
        run has ended (then the job is done, and is not run again)."""
        run = self._executing.get(job_id)
        if run is None and job_id not in self._ran:
            accepted = await self._store.is_accepted(job_id)
            run = self._executing.get(job_id)  # (one may have begun, or ended, meanwhile)
            if run is None:
                if not accepted or job_id in self._ran:
                    return
                run = asyncio.create_task(self._execute(job_id, *args), name=f"execute-{job_id}")
                self._executing[job_id] = run
                run.add_done_callback(functools.partial(self._run_ended, job_id))
        if run is not None:
            await asyncio.shield(run)

    def _run_ended(self, job_id: int, run: asyncio.Task[None]) -> None:
        del self._executing[job_id]
        if not run.cancelled() and run.exception() is None:  # (else the job runs again)
            self._ran[job_id] = None
            if len(self._ran) > RAN_KEPT:
                del self._ran[next(iter(self._ran))]

    async def _serve(self, channel: Channel, call_id: int, call: Awaitable[Any]) -> None:
        try:
            value = await call
        except Exception as exc:
            channel.send(_failed(call_id, exc))
        else:
            channel.send(("reply", call_id, value, None))

    def _written(self, channel: Channel, call_id: int, written: asyncio.Future[Any]) -> None:
        self._writing.discard(written)
        if written.cancelled():
            channel.send(_failed(call_id, StoreError("the write was cancelled")))
        elif (error := written.exception()) is not None:
            channel.send(_failed(call_id, error))
        else:
            channel.send(("reply", call_id, written.result(), None))


def _failed(call_id: int, error: BaseException) -> tuple[Any, ...]:
    """The reply to a call that raised: the store's own errors as they are, a bug as a
    RuntimeError that says what it was (logged here, with its traceback)."""
    if isinstance(error, (StoreError, ResultTooLarge)):
        return ("reply", call_id, None, error)
    log.error("a call from the worker process failed", exc_info=error)
    return ("reply", call_id, None, RuntimeError(f"{type(error).__name__}: {error}"))


def _child_environment() -> dict[str, str]:
    """The child imports this very code, installed or not."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


# -- the child's side ------------------------------------------------------------------


class RemoteStore:
    """`JobQueue` over the channel: each method is one call to the proxy's store."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)

    def replied(self, call_id: int, value: Any, error: BaseException | None) -> None:
        reply = self._replies.pop(call_id, None)
        if reply is None or reply.done():
            return  # its caller was cancelled (the child stops)
        if error is None:
            reply.set_result(value)
        else:
            reply.set_exception(error)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        assert self.channel is not None
        call_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._replies[call_id] = reply
        self.channel.send(("call", call_id, name, args, kwargs))
        try:
            return await reply
        finally:
            self._replies.pop(call_id, None)

    async def next_accepted(
        self, limit: int, exclude: Collection[int] = (), unsent: Collection[int] = ()
    ) -> list[Job]:
        return cast(
            list[Job], await self._call("next_accepted", limit, tuple(exclude), tuple(unsent))
        )

    async def submitted(self) -> list[Job]:
        return cast(list[Job], await self._call("submitted"))

    async def mark_submitted(self, job_id: int, upstream_id: str) -> Mark:
        return cast(Mark, await self._call("mark_submitted", job_id, upstream_id))

    async def requeue(self, job_id: int, upstream_id: str) -> bool:
        return cast(bool, await self._call("requeue", job_id, upstream_id))

    async def finish(
        self,
        job_id: int,
        response: StoredResponse,
        *,
        from_states: Collection[JobState] = UNFINISHED,
        upstream_id: str | None = None,
    ) -> bool:
        reason = too_large_for_a_row(len(response.body))  # (the proxy checks it whole)
        if reason:
            raise ResultTooLarge(reason)  # not sent at all: a frame holds at most 4 GiB
        states = tuple(from_states)
        return cast(
            bool,
            await self._call(
                "finish", job_id, response, from_states=states, upstream_id=upstream_id
            ),
        )

    async def execute(self, job_id: int, method: str, target: str, user: str) -> None:
        await self._call("execute", job_id, method, target, user)


class _Child:
    def __init__(self) -> None:
        self.store = RemoteStore()
        self.channel = Channel(self._received, self._lost)
        self.store.channel = self.channel
        self._inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._counts: Counter[str] = Counter()
        self._done = False

    def _received(self, message: tuple[Any, ...]) -> None:
        if message[0] == "reply":
            self.store.replied(*message[1:])
        else:
            self._inbox.put_nowait(message)

    def _lost(self) -> None:
        if not self._done:
            log.warning("the proxy is gone (its end of the socket closed): exiting")
            os._exit(1)

    async def run(self) -> None:
        kind, config, credentials = await self._inbox.get()
        assert kind == "start"
        _configure(config)
        upstream = Upstream(config.upstream)
        await upstream.start()
        workers = Workers(
            self.store,
            upstream,
            cast(JobCredentials, credentials),
            execute=self.store.execute,
            jobs=config.jobs,
            metrics=self._counts,
        )
        await workers.start()
        counting = asyncio.create_task(self._count())
        while True:
            message = await self._inbox.get()
            if message[0] == "wake":
                workers.wake()
            elif message[0] == "stop":
                workers.stop_dispatching()
            elif message[0] == "drain":
                await workers.stop(message[1])
                break
        counting.cancel()
        self._send_counts()
        await upstream.close()
        self._done = True
        self.channel.close()

    async def _count(self) -> None:
        while True:
            await asyncio.sleep(COUNT_EVERY)
            self._send_counts()

    def _send_counts(self) -> None:
        if self._counts:
            self.channel.send(("count", dict(self._counts)))
            self._counts.clear()


def _configure(config: Config) -> None:
    from proxy.cli import configure_logging  # noqa: PLC0415 - cli imports this module

    configure_logging(config.log.level)


async def _child(fd: int) -> None:
    child = _Child()
    sock = socket.socket(fileno=fd)
    await asyncio.get_running_loop().create_unix_connection(lambda: child.channel, sock=sock)
    await child.run()


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the proxy stops this process in order
    from proxy.cli import run  # noqa: PLC0415 - cli imports this module

    run(_child(int(sys.argv[1])))


if __name__ == "__main__":
    main()

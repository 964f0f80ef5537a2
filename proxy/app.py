"""Builds the aiohttp application: the route table and the lifetimes of its parts.

Start-up: upstream session, then the job store, then harvester and dispatcher
(which resume every stored job). Shutdown, all within ``server.shutdown_grace``
counted from when aiohttp stops accepting: no new submissions; handlers under
way finish (cancelled at the grace); submissions under way finish, so none is
sent twice; the harvester ends its tick, storing the results it fetched; the
store closes (queued writes are committed first); the upstream session last.
Jobs still at ArangoDB stay ``submitted`` and are harvested after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy import jobs_api, ops
from proxy.auth import Verifier
from proxy.config import Config
from proxy.dispatcher import Dispatcher
from proxy.harvester import Harvester
from proxy.intake import async_mode, intake
from proxy.passthrough import passthrough
from proxy.state import (
    CONFIG,
    DISPATCHER,
    METRICS,
    SHUTDOWN,
    STORE,
    UPSTREAM,
    VERIFIER,
    ShutdownClock,
)
from proxy.upstream import Upstream
from storage import JobStore


async def front(request: web.Request) -> web.StreamResponse:
    """Everything outside the job API: an async job, or pass-through."""
    mode = async_mode(request)
    if mode is not None:
        return await intake(request, mode)
    return await passthrough(request)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream = Upstream(app[CONFIG].upstream)
    await upstream.start()
    app[UPSTREAM] = upstream
    app[VERIFIER] = Verifier(upstream, app[CONFIG].jobs.auth_cache_ttl)
    yield
    await upstream.close()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[STORE] = await JobStore.open(
        Path(config.storage.data),
        synchronous=config.storage.synchronous,
        capacity=config.jobs.capacity,
        max_size=config.storage.max_db_size,
    )
    yield
    await app[STORE].close()


async def _begin_shutdown(app: web.Application) -> None:
    app[SHUTDOWN].begin()


async def _workers_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].jobs
    dispatcher: Dispatcher | None = None

    def wake_dispatcher() -> None:
        assert dispatcher is not None
        dispatcher.wake()

    harvester = Harvester(
        app[STORE], app[UPSTREAM], config.lost_job_policy, wake_dispatcher, app[METRICS]
    )
    await harvester.load()
    dispatcher = Dispatcher(
        app,
        app[STORE],
        app[UPSTREAM],
        harvester,
        max_inflight=config.max_inflight,
        metrics=app[METRICS],
    )
    app[DISPATCHER] = dispatcher
    dispatching = asyncio.create_task(dispatcher.run(), name="dispatcher")
    harvesting = asyncio.create_task(harvester.run(), name="harvester")

    # No new submissions once the stop begins; those under way finish below.
    def stop_dispatching() -> None:
        dispatching.cancel()

    app[SHUTDOWN].on_begin.append(stop_dispatching)
    yield
    clock = app[SHUTDOWN]
    dispatching.cancel()
    await dispatcher.drain(clock.remaining())
    harvester.stop()
    # A tick under way stores the results it fetched; jobs still at ArangoDB stay
    # `submitted` and are harvested after the next start.
    await asyncio.wait([harvesting], timeout=clock.remaining())
    harvesting.cancel()
    for task in (dispatching, harvesting):
        with contextlib.suppress(asyncio.CancelledError):
            await task


def runner_options(config: Config) -> dict[str, Any]:
    """How the server runs the application (aiohttp's AppRunner keywords)."""
    # The keep-alive timer also runs while a request's headers arrive, so
    # idle_timeout bounds slow senders of headers too. A client that hangs up
    # must not cancel its handler half-way (the intake also shields its write).
    # shutdown_timeout: how long a graceful stop waits for handlers under way.
    return {
        "keepalive_timeout": config.server.idle_timeout,
        "access_log": None,
        "handler_cancellation": False,
        "shutdown_timeout": config.server.shutdown_grace,
    }


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_size)
    app[CONFIG] = config
    app[METRICS] = Counter()
    app[SHUTDOWN] = ShutdownClock(config.server.shutdown_grace)
    app.on_shutdown.append(_begin_shutdown)
    app.cleanup_ctx.extend([_upstream_ctx, _store_ctx, _workers_ctx])
    app.router.add_routes(
        [
            web.get("/_proxy/health", ops.health),
            web.get("/_proxy/ready", ops.ready),
            web.get("/_proxy/metrics", ops.metrics),
            *(web.route("*", path, jobs_api.handle) for path in jobs_api.ROUTES),
            web.route("*", "/{tail:.*}", front),
        ]
    )
    return app

"""Builds the aiohttp application: the route table and the lifetimes of its parts.

Start-up: upstream session, then the job store, then harvester and dispatcher
(which resume every stored job; in the worker process unless ``jobs.workers``
is "inline"), then retention (when configured). Shutdown, all within
``server.shutdown_grace`` counted from when aiohttp stops accepting:
no new submissions; handlers under way finish (cancelled at the grace);
retention stops; submissions under way finish, so none is sent twice; the
harvester ends its tick, storing the results it fetched; the store closes
(queued writes are committed first); the upstream session last. Jobs still at
ArangoDB stay ``submitted`` and are harvested after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from proxy import jobs_api, ops
from proxy.arango_request import header
from proxy.auth import Verifier
from proxy.config import MAX_HEADER_FIELDS, Config
from proxy.cors import Origins
from proxy.errors import (
    ERROR_BAD_PARAMETER,
    ERROR_INTERNAL,
    arango_error,
    headers_too_large,
)
from proxy.intake import async_mode, intake
from proxy.passthrough import passthrough
from proxy.retention import Retention
from proxy.state import (
    CONFIG,
    CREDENTIALS,
    DISPATCHER,
    METRICS,
    ORIGINS,
    SHUTDOWN,
    STORE,
    UPSTREAM,
    VERIFIER,
    ShutdownClock,
)
from proxy.tokens import ClientCredentials, JobCredentials, SignedTokens
from proxy.upstream import Upstream
from proxy.worker_process import WorkerProcess
from proxy.workers import Workers
from storage import JobStore

log = logging.getLogger(__name__)

# the methods ArangoDB serves; any other gets its bare 405 before anything else
ARANGO_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})


@web.middleware
async def refuse_unservable(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Requests the proxy must not route: answered here, as ArangoDB answers them.

    - A method ArangoDB does not serve (TRACE, CONNECT, PROPFIND, ...): 405, empty,
      and the connection closed, as ArangoDB's parser stops at it; never a job.
    - A target that is no path. aiohttp also accepts absolute-form (``GET
      http://host/x``) and asterisk-form (``OPTIONS *``) targets (authority-form
      comes only with CONNECT, refused above): glued to the upstream URL they made an
      invalid URL (a 500), and as an async job one the dispatcher could never
      send. ArangoDB serves none of them (it finds no handler for such a path).
    - Header fields over ``server.max_header_size`` in all: 431, as for one field
      over it or too many fields, which aiohttp's parser refuses as it reads them
      (`runner_options`, proxy.listener).

    And a bug while serving a request gets ArangoDB's 500 (errorNum 4, "internal
    error"), logged, with the connection closed, where aiohttp would answer a
    text/plain 500; unless part of an answer has gone out already (a stream passed
    through), and then aiohttp closes the connection.
    """
    if request.method not in ARANGO_METHODS:
        # as ArangoDB's: no body, and it hangs up
        response = web.Response(status=405, headers={"Server": "ArangoDB"})
        response.force_close()
        return response
    if not request.raw_path.startswith("/"):
        return arango_error(400, ERROR_BAD_PARAMETER, "the request target must be a path")
    limit = request.app[CONFIG].server.max_header_size
    if sum(len(name) + len(value) + 4 for name, value in request.raw_headers) > limit:
        return headers_too_large(limit)
    try:
        return await handler(request)
    except (web.HTTPException, ConnectionError):
        raise
    except Exception:
        if request.writer.output_size:
            raise
        log.exception("error serving %s %s", request.method, request.raw_path)
        response = arango_error(500, ERROR_INTERNAL, "internal error")
        response.force_close()
        return response


async def front(request: web.Request) -> web.StreamResponse:
    """Everything the route table did not send to the job facade."""
    if request.method == "OPTIONS":
        return await passthrough(request)  # CORS preflight: ArangoDB never queues it
    if jobs_api.is_job_api(request.raw_path):
        # spelled with repeated slashes (//_api//job): ArangoDB's job API all the same
        return await jobs_api.handle(request)
    mode = async_mode(request)
    if mode is not None:
        return await intake(request, mode)
    return await passthrough(request)


async def meet_expectation(request: web.Request) -> None:
    """``Expect: 100-continue`` gets its ``100 Continue``; any other expectation is
    ignored, as ArangoDB ignores it (aiohttp's own handler answers it 417)."""
    expectation = request.headers.get(hdrs.EXPECT, "").strip().lower()
    if expectation == "100-continue" and request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response's own size starts after it


async def _with_arango_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The proxy's own answers carry ArangoDB's standard headers (proxy.arango_headers),
    and its CORS headers for a request with an Origin (proxy.cors): not passed-through
    ones (streamed: they have ArangoDB's own), nor /_proxy/..."""
    verifier = request.app.get(VERIFIER)
    if type(response) is web.Response and verifier and not request.path.startswith("/_proxy/"):
        verifier.arango_headers.apply(response.headers)
        origin = header(request.headers, "Origin")
        if origin:
            await request.app[ORIGINS].apply(origin, response.headers)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream = app[UPSTREAM]
    await upstream.start()
    app[VERIFIER] = Verifier(upstream, app[CONFIG].jobs.auth_cache_ttl)
    app[ORIGINS] = Origins(upstream, app[CONFIG].jobs.auth_cache_ttl)
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
    config = app[CONFIG]
    workers: WorkerProcess | Workers
    if config.jobs.workers == "process":
        workers = WorkerProcess(app)
    else:
        workers = Workers(
            app[STORE],
            app[UPSTREAM],
            app[CREDENTIALS],
            execute=functools.partial(jobs_api.execute, app),
            jobs=config.jobs,
            metrics=app[METRICS],
        )
    await workers.start()
    app[DISPATCHER] = workers
    # No new submissions once the stop begins; those under way finish below.
    app[SHUTDOWN].on_begin.append(workers.stop_dispatching)
    yield
    await workers.stop(app[SHUTDOWN].remaining())


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].jobs
    store = app[STORE]
    retention = Retention(
        store, ttl=config.result_ttl, max_bytes=config.max_result_bytes, metrics=app[METRICS]
    )
    if not retention.enabled:
        yield
        return
    store.set_result_listener(retention.result_stored)
    task = asyncio.create_task(retention.run(), name="retention")
    yield
    store.set_result_listener(None)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def runner_options(config: Config) -> dict[str, Any]:
    """How the server runs the application (aiohttp's AppRunner keywords)."""
    # The keep-alive timer also runs while a request's headers arrive, so
    # idle_timeout bounds slow senders of headers too. A client that hangs up
    # must not cancel its handler half-way (an accept's write, a fetch's claim).
    # The parser refuses a field larger than server.max_header_size, and more than
    # MAX_HEADER_FIELDS fields, as it reads them (proxy.listener answers those 431 in
    # ArangoDB's shape): what it holds for one connection's head is bounded. Any
    # other oversize head is parsed, then refused by refuse_unservable.
    # shutdown_timeout: how long a graceful stop waits for handlers under way.
    # Bodies are read as sent: a gzip or deflate body goes to ArangoDB with its
    # Content-Encoding and Content-Length, and ArangoDB decodes it (or refuses).
    return {
        "auto_decompress": False,
        "max_field_size": config.server.max_header_size,
        "max_headers": MAX_HEADER_FIELDS,
        "keepalive_timeout": config.server.idle_timeout,
        "access_log": None,
        "handler_cancellation": False,
        "shutdown_timeout": config.server.shutdown_grace,
    }


def create_app(config: Config) -> web.Application:
    """Raises `ConfigError` when `upstream.ca_file` or `upstream.jwt_secret_file`
    cannot be used."""
    app = web.Application(
        client_max_size=config.server.max_body_size,
        middlewares=[refuse_unservable],
    )
    app[CONFIG] = config
    # built here, not at start-up, so a bad CA or secret file stops the command at once
    app[UPSTREAM] = Upstream(config.upstream)
    secret_file = config.upstream.jwt_secret_file
    credentials: JobCredentials = (
        SignedTokens.from_file(secret_file) if secret_file else ClientCredentials()
    )
    app[CREDENTIALS] = credentials
    app[METRICS] = Counter()
    app[SHUTDOWN] = ShutdownClock(config.server.shutdown_grace)
    app.on_shutdown.append(_begin_shutdown)
    app.on_response_prepare.append(_with_arango_headers)
    app.cleanup_ctx.extend([_upstream_ctx, _store_ctx, _workers_ctx, _retention_ctx])
    met: dict[str, Any] = {"expect_handler": meet_expectation}
    app.router.add_routes(
        [
            web.get("/_proxy/health", ops.health, **met),
            web.get("/_proxy/ready", ops.ready, **met),
            web.get("/_proxy/metrics", ops.metrics, **met),
            *(web.route("*", path, jobs_api.handle, **met) for path in jobs_api.ROUTES),
            # [\s\S], not ".": a decoded path may hold a newline (%0A), and a
            # route that misses it leaves aiohttp to answer a plain-text 404
            web.route("*", r"/{tail:[\s\S]*}", front, **met),
        ]
    )
    return app

"""The stand-in server: an aiohttp app that answers like a single ArangoDB 3.12.

Every request goes the way `CommTask` sends it (spec §1.3, §9):

    OPTIONS ............................ 200 at once (CORS preflight)
    credentials unreadable or wrong .... 401/11, never queued
    /_db/<unknown>/... ................. 404/1228
    gzip/deflate body that won't decode  400/10 "decoding error" (else decoded)
    x-arango-queue-time-seconds too low  412/21004
    x-arango-async: true | store ....... 202 (+ x-arango-async-id), or 503/21003 when full
    anything else ...................... the handler, synchronously

Queued and synchronous requests run through the same `_run`, so a job's stored
result is byte for byte what the synchronous call would have answered.
`/_standin/...` are test controls: no auth, never async. `POST
/_standin/outage?seconds=N` takes the server off the network for N seconds
(connections refused and cut) while keeping every job, result and document,
unlike `/_standin/restart`, which forgets jobs and results but stays reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tests.standin.auth import Authenticator
from tests.standin.call import Call, double_decimal, last_fields, query_values
from tests.standin.cursors import CursorApi
from tests.standin.data import Store, Ticks
from tests.standin.documents import DataApi
from tests.standin.jobs import ASYNC_ID, Job, JobManager, job_api
from tests.standin.reply import (
    DATABASE_NOT_FOUND,
    DECODING_ERROR,
    NOT_AUTHORIZED,
    QUEUE_FULL,
    QUEUE_TIME_VIOLATED,
    Reply,
    handler_error,
    json_reply,
)
from tests.standin.scheduler import Scheduler

log = logging.getLogger(__name__)

Handler = Callable[[Call], Awaitable[Reply]]

DEFAULT_USERS = {"root": "", "alice": "alicepw", "bob": "bobpw"}
CORS_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
# StaticStrings::ExposedCorsHeaders
EXPOSED_CORS_HEADERS = (
    "etag, content-encoding, content-length, location, server, x-arango-errors, x-arango-async-id"
)
# CommTask::finishExecution adds these to every response, if not set already
STANDARD_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("content-security-policy", "frame-ancestors 'self'; form-action 'self';"),
    (
        "cache-control",
        "no-cache, no-store, must-revalidate, pre-check=0, post-check=0, max-age=0, s-maxage=0",
    ),
    ("pragma", "no-cache"),
    ("expires", "0"),
    ("strict-transport-security", "max-age=31536000 ; includeSubDomains"),
)
WWW_AUTHENTICATE = ('Basic, realm="ArangoDB"', 'Bearer, token_type="JWT", realm="ArangoDB"')


def preflight(fields: CIMultiDictProxy[str]) -> Reply:
    """`CommTask::processCorsOptions`: the answer to any OPTIONS request, before
    credentials (and `_finish`'s CORS headers, as for every answer)."""
    headers = [("allow", CORS_METHODS)]
    if fields.get("origin"):
        headers.append(("access-control-allow-methods", CORS_METHODS))
        requested = fields.get("access-control-request-headers", "").strip(" \t\r\n")
        if requested:  # all of them, unchecked
            headers.append(("access-control-allow-headers", requested))
        headers.append(("access-control-max-age", "1800"))
    return Reply(200, headers=tuple(headers))


def split_database(raw_path: str) -> tuple[str, str]:
    """`/_db/shop/_api/x` -> ("shop", "/_api/x"); no prefix means `_system`.

    Repeated slashes are collapsed first, as `HttpRequest::parseUrl` does:
    `//_db/shop//_api/x` is the same request.
    """
    raw_path = re.sub(r"//+", "/", raw_path)
    if not raw_path.startswith("/_db/"):
        return "_system", raw_path
    name, slash, rest = raw_path[len("/_db/") :].partition("/")
    return unquote(name), slash + rest or "/"


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded(encoding: str | None, body: bytes) -> bytes | None:
    """`handleContentEncoding`: a gzip or deflate (zlib) body decoded, None if it
    does not decode whole; a body in any other encoding as it came."""
    wbits = _WBITS.get(encoding or "")
    if wbits is None:
        return body
    decoder = zlib.decompressobj(wbits)
    try:
        plain = decoder.decompress(body)
    except zlib.error:
        return None
    return plain if decoder.eof else None


_NUMBER = re.compile(r"/\d+(?=/|$)")


class StandIn:
    """An ArangoDB stand-in, in-process. See tests/standin/__init__.py for the API."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        auth: bool = True,
        workers: int = 4,
        queue_size: int = 128,
        jwt_secret: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        trusted_origins: tuple[str, ...] = (),
    ) -> None:
        self.authenticator = Authenticator(
            dict(DEFAULT_USERS if users is None else users), auth, jwt_secret
        )
        self.workers = workers
        self.ssl_context = ssl_context  # serve TLS only (https://) when set
        # --http.trusted-origin: origins whose requests may carry credentials ("*": all)
        self.trusted_origins = trusted_origins
        self.queue_size = queue_size
        self.queue_full = False
        self.executed: Counter[tuple[str, str]] = Counter()
        # every request as it arrived, before any check: (method, raw path, Authorization)
        self.received: list[tuple[str, str, str | None]] = []
        self.ticks = Ticks()
        self.store = Store(self.ticks)
        self.data = DataApi(self.store)
        # lost on restart, like everything ArangoDB keeps only in memory
        self.jobs = JobManager()
        self.cursors = CursorApi(self.store)
        self._scheduler: Scheduler | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._address = ("127.0.0.1", 0)
        self._outage: asyncio.Task[None] | None = None
        self._url: str | None = None
        # ArangoDB's handlers, each a prefix of the path after /_db/<name>
        self.routes: list[tuple[str, Handler]] = [
            ("/_api/version", self.data.version),
            ("/_admin/version", self.data.version),
            ("/_api/job", self._jobs),
            ("/_admin/job", self._jobs),
            ("/_api/database", self.data.database),
            ("/_api/collection", self.data.collection),
            ("/_api/document", self.data.document),
            ("/_api/cursor", self._cursor),
        ]

    # -- life cycle ----------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the stand-in is not started")
        return self._url

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the stand-in is not started")
        return self._scheduler

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._finish)
        app.router.add_routes(
            [
                web.post("/_standin/restart", self._control_restart),
                web.put("/_standin/queue-full", self._control_queue_full),
                web.get("/_standin/counters", self._control_counters),
                web.post("/_standin/outage", self._control_outage),
                # [\s\S]: a decoded path may hold a newline (%0A); ArangoDB serves it
                web.route("*", r"/{tail:[\s\S]*}", self._serve),
            ]
        )
        # a short grace period: a synchronous SLEEP must not hold up a test's teardown
        # (bodies decoded as ArangoDB does, after the credentials: _serve)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, auto_decompress=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        self._site = site
        bound_port = runner.addresses[0][1]
        scheme = "http" if self.ssl_context is None else "https"
        self._url = f"{scheme}://{host}:{bound_port}"
        self._address = (host, bound_port)
        self._scheduler = Scheduler(self._run, self.jobs, self.workers, self.queue_size)
        return self._url

    async def restart(self) -> None:
        """Forget every job, job result and cursor; data and the tick counter survive."""
        await self.scheduler.close()
        self.jobs = JobManager()
        self.cursors = CursorApi(self.store)
        self._scheduler = Scheduler(self._run, self.jobs, self.workers, self.queue_size)

    async def unreachable(self, seconds: float) -> None:
        """Be gone from the network for `seconds`, as a host that is down or cut off.

        The listening socket is closed (connections are refused) and every open
        connection is cut, requests under way included; then the same address is
        served again. Unlike restart(), nothing is forgotten: jobs queued before
        run on, and data, jobs and results are all still there afterwards.
        """
        await self.go_offline()
        await asyncio.sleep(seconds)
        await self.go_online()

    async def go_offline(self) -> None:
        """`unreachable` until `go_online`."""
        assert self._runner is not None
        assert self._site is not None
        await self._site.stop()
        self._site = None
        server = self._runner.server
        assert server is not None
        for connection in list(server.connections):
            connection.force_close()

    async def go_online(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, *self._address, ssl_context=self.ssl_context)
        await site.start()
        self._site = site

    async def stop(self) -> None:
        if self._outage is not None:
            self._outage.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._outage
        if self._scheduler is not None:
            await self._scheduler.close()
            self._scheduler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def write_count(self, db: str, collection: str, key: str) -> int:
        return self.store.writes[(db, collection, key)]

    # -- the request pipeline ------------------------------------------------

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        fields = last_fields(request.headers)
        authorization = fields.get("authorization")
        self.received.append((request.method, request.rel_url.raw_path, authorization))
        if request.method == "OPTIONS":
            return self._send(request, preflight(fields))
        identity = self.authenticator.identify(authorization)
        if identity is None:
            return self._send(request, NOT_AUTHORIZED)
        database, path = split_database(request.rel_url.raw_path)
        if database not in self.store.databases:
            return self._send(request, DATABASE_NOT_FOUND)
        body = decoded(fields.get("content-encoding"), await request.read())
        if body is None:
            return self._send(request, DECODING_ERROR)
        call = Call(
            method=request.method,
            database=database,
            path=path,
            query=query_values(request.rel_url.raw_query_string),
            headers=fields,
            body=body,
            identity=identity,
            target=request.rel_url.raw_path,
        )
        limit = fields.get("x-arango-queue-time-seconds")
        if limit is not None and 0.0 < double_decimal(limit) < self.scheduler.last_wait:
            return self._send(request, QUEUE_TIME_VIOLATED)
        mode = fields.get("x-arango-async")
        if mode in ("true", "store"):
            return self._send(request, self._enqueue(call, store=mode == "store"))
        return self._send(request, await self._run(call))

    def _enqueue(self, call: Call, store: bool) -> Reply:
        # ArangoDB registers a `store` job before it tries the queue, so a job
        # refused with 503 stays listed as pending until deleted (spec §10.1).
        # No client can use that entry, and it would make the proxy's tests
        # depend on a leak, so the stand-in checks for room first.
        if self.queue_full or self.scheduler.full():
            return QUEUE_FULL
        job = Job(call, self.ticks.next() if store else 0)
        if store:
            self.jobs.register(job)
        self.scheduler.offer(job)
        return Reply(202, headers=((ASYNC_ID, str(job.job_id)),) if store else ())

    def _route(self, path: str) -> tuple[Handler, list[str]] | None:
        for prefix, handler in self.routes:
            if path == prefix or path.startswith(prefix + "/"):
                return handler, [part for part in path[len(prefix) :].split("/") if part]
        return None

    async def _run(self, call: Call) -> Reply:
        """Run the handler for `call`, synchronously or on a worker."""
        found = self._route(call.path)
        if found is None:
            return handler_error(404, 404, f"unknown path '{unquote(call.path)}'")
        handler, call.suffixes = found
        self.executed[(call.method, call.target)] += 1
        try:
            return await handler(call)
        except Exception as exc:
            log.exception("stand-in handler failed for %s %s", call.method, call.target)
            return handler_error(500, 4, f"internal error: {exc}")

    async def _jobs(self, call: Call) -> Reply:
        return job_api(call, self.jobs)

    async def _cursor(self, call: Call) -> Reply:
        return await self.cursors.handle(call)

    def _send(self, request: web.Request, reply: Reply) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict(reply.headers)
        headers["content-type"] = reply.content_type
        return web.Response(status=reply.status, body=reply.body, headers=headers)

    async def _finish(self, request: web.Request, response: web.StreamResponse) -> None:
        """`CommTask::finishExecution` and `sendResponse`: headers for every response."""
        origin = last_fields(request.headers).get("origin")
        if origin:  # CORS: the origin sent back, whatever it is
            response.headers.setdefault("access-control-allow-origin", origin)
            allowed = "true" if self.allows_credentials(origin) else "false"
            response.headers.setdefault("access-control-allow-credentials", allowed)
            response.headers.setdefault("access-control-expose-headers", EXPOSED_CORS_HEADERS)
        response.headers["server"] = "ArangoDB"  # replaces aiohttp's own
        for name, value in STANDARD_HEADERS:
            response.headers.setdefault(name, value)
        last_wait = self._scheduler.last_wait if self._scheduler else 0.0
        response.headers["x-arango-queue-time-seconds"] = f"{last_wait:.6f}"
        if response.status == 401 and "x-omit-www-authenticate" not in request.headers:
            for value in WWW_AUTHENTICATE:
                response.headers.add("www-authenticate", value)

    def allows_credentials(self, origin: str) -> bool:
        """`CommTask::allowCorsCredentials`: a trusted origin (one trailing slash of
        the request's ignored), or every origin when the first trusted one is "*"."""
        trusted = self.trusted_origins
        if not trusted:
            return False
        return trusted[0] == "*" or origin.removesuffix("/") in trusted

    # -- test controls -------------------------------------------------------

    async def _control_restart(self, request: web.Request) -> web.Response:
        await self.restart()
        return self._send(request, json_reply(200, {"restarted": True}))

    async def _control_queue_full(self, request: web.Request) -> web.Response:
        text = (await request.text()).strip()
        if text not in ("true", "false"):
            return self._send(request, json_reply(400, {"error": "expected true or false"}))
        self.queue_full = text == "true"
        return self._send(request, json_reply(200, {"queueFull": self.queue_full}))

    async def _control_outage(self, request: web.Request) -> web.Response:
        try:
            seconds = float(request.query.get("seconds", ""))
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 600 or (self._outage is not None and not self._outage.done()):
            return self._send(request, json_reply(400, {"error": "expected ?seconds=0..600"}))

        async def outage() -> None:
            await asyncio.sleep(0.05)  # this reply goes out first
            await self.unreachable(seconds)

        self._outage = asyncio.create_task(outage())
        return self._send(request, json_reply(200, {"outage": seconds}))

    async def _control_counters(self, request: web.Request) -> web.Response:
        # every request served, by method and path, each number in it (a job id) as {id}
        requests = Counter(
            f"{method} {_NUMBER.sub('/{id}', target.partition('?')[0])}"
            for method, target, _ in self.received
        )
        writes = {"/".join(key): n for key, n in sorted(self.store.writes.items())}
        executed: dict[str, Any] = {
            f"{method} {path}": n for (method, path), n in sorted(self.executed.items())
        }
        repeats = {
            "/".join(key): times
            for key, times in sorted(self.store.write_times.items())
            if len(times) > 1
        }
        body = {
            "writes": writes,
            "executed": executed,
            "repeats": repeats,
            "requests": dict(sorted(requests.items())),
        }
        return self._send(request, json_reply(200, body))


__all__ = ["DEFAULT_USERS", "StandIn"]

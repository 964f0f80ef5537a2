"""The fast path: async submissions served without aiohttp's request cycle.

Why: the proxy runs on one core's worth of Python (the GIL is shared by the
event loop and the store's threads), and under a burst of submissions aiohttp's
own handling of each request (request and response objects, router,
middleware, writer) cost more of it than the intake itself: about 130 us of the
loop's time per accept through aiohttp, about 75 us here (bench/accept.py's load,
dispatcher and harvester running).

How: every client connection starts here. A request that has arrived whole, is
framed in the plainest way HTTP/1.1 allows, and is an async submission to a path
that no route of the application claims, is parsed here, verified and stored by
the intake's own functions (`proxy.intake.admit` and `accept`, so every answer is
the one aiohttp's path gives), and answered here. Anything else hands the
connection to aiohttp at that request's first byte: the transport's protocol
becomes aiohttp's, which is fed every byte from there on and serves the
connection for the rest of its life. aiohttp's parser thus judges everything
unusual (malformed, oversize, chunked, trickling in, pipelined behind something
partial), and this module only has to be exact about what it takes.

What it takes, all of it at once:

    request line   METHOD /path[?query] HTTP/1.1; GET, POST, PUT, DELETE or PATCH;
                   the characters RFC 3986 allows; a path without %-escapes,
                   empty or dot segments, not /_proxy...
    header fields  name: value, token names, printable ASCII values; in all
                   within server.max_header_size (as refuse_unservable counts)
    exactly one    Host; and x-arango-async, "true" or "store", unless it is
                   a request for the job API
    at most one    Content-Length (digits, within server.max_body_size); the body
                   is already here
    none of        Transfer-Encoding, Expect, Upgrade; a Connection other than
                   keep-alive or close

A connection stays here while idle for server.idle_timeout at most, as aiohttp's
keep-alive. A request is never cancelled because its client left (as
``handler_cancellation=False``): its job is stored, only the 202 is lost.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from yarl import URL

from proxy import jobs_api
from proxy.app import runner_options
from proxy.intake import ASYNC_HEADER, NOT_STORED, accept, admit
from proxy.passthrough import forwarded
from proxy.state import CONFIG, METRICS, SHUTDOWN, VERIFIER
from storage import JobMode

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"
_MAX_LINE = 8190  # aiohttp's max_line_size: a longer request line gets its 400
_PAUSE_AT = 256 * 1024  # bytes waiting behind a request under way: stop reading
# methods ArangoDB serves that llhttp (aiohttp's parser) knows; RFC 3986 characters
_REQUEST_LINE = re.compile(
    r"(GET|POST|PUT|DELETE|PATCH) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1"
)
_FIELD = r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[!-~]+(?:[ \t]+[!-~]+)*)?)[ \t]*\r\n"
_FIELDS = re.compile(f"(?:{_FIELD})*")  # the whole block, each field ending with CRLF
_EACH_FIELD = re.compile(_FIELD)
# the fields the fast path looks at, found in the block (checked by _FIELDS) at once
_NOTED = re.compile(
    r"^(host|x-arango-async|content-length|connection|authorization|transfer-encoding|expect"
    r"|upgrade):[ \t]*(.*?)[ \t]*\r$",
    re.IGNORECASE | re.MULTILINE,
)
_ODD_PATH = re.compile(r"%|#|//|/\.\.?(?:/|$)")
_REFUSED_FIELDS = frozenset({"transfer-encoding", "expect", "upgrade"})
_MODES = {"true": JobMode.FORGET, "store": JobMode.STORE}


class Submission:
    """An async request that the fast path takes, parsed."""

    __slots__ = (
        "authorization",
        "body",
        "close",
        "headers",
        "host",
        "length",
        "method",
        "mode",
        "target",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.headers: list[tuple[str, str]] = []
        self.host = ""
        self.authorization: str | None = None  # the first Authorization field
        self.mode: JobMode | None = None  # None: a request for the job API
        self.length = 0  # of the body, from Content-Length
        self.body = b""
        self.close = False


def parse(head: bytes, max_header_size: int, max_body_size: int) -> Submission | None:
    """The submission in `head` (without its blank line; its body not yet read), or
    None when aiohttp must have it."""
    text = head.decode("latin-1") + "\r\n"
    line, _, fields = text.partition("\r\n")
    submission = _request_line(line)
    if submission is None or _FIELDS.fullmatch(fields) is None:
        return None
    headers: list[tuple[str, str]] = _EACH_FIELD.findall(fields)
    size = sum(len(name) + len(value) for name, value in headers) + 4 * len(headers)
    if size > max_header_size or len(headers) >= max_header_size // 8:
        return None  # refuse_unservable's 431, or aiohttp's 400 for too many fields
    submission.headers = headers
    seen = {"host": 0, ASYNC_HEADER: 0, "content-length": 0}
    for name, value in _NOTED.findall(fields):
        lower = name.lower()
        if lower in seen:
            seen[lower] += 1
        if not _take(submission, lower, value):
            return None
    if (
        seen["host"] != 1
        or seen[ASYNC_HEADER] > 1
        or seen["content-length"] > 1
        or submission.length > max_body_size  # aiohttp's path answers the 413
        # neither async nor the job API: pass-through
        or (submission.mode is None and not jobs_api.is_job_api(submission.target))
    ):
        return None
    return submission


def _request_line(line: str) -> Submission | None:
    if len(line) > _MAX_LINE:
        return None
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return None
    submission = Submission()
    submission.method = match[1]
    submission.target = match[2]
    path = submission.target.partition("?")[0]
    if _ODD_PATH.search(path):
        return None
    if path.startswith("/_proxy"):
        return None  # the proxy's own routes
    return submission


def _take(submission: Submission, lower: str, value: str) -> bool:
    """Note what `submission` needs of a field; False if aiohttp must have it."""
    if lower == "host":
        submission.host = value
    elif lower == ASYNC_HEADER:
        mode = _MODES.get(value)
        if mode is None:
            return False
        submission.mode = mode
    elif lower == "content-length":
        if not value.isdigit() or len(value) > 18:  # (int() refuses 4,300 digits)
            return False
        submission.length = int(value)
    elif lower == "authorization":
        if submission.authorization is None:
            submission.authorization = value
    elif lower == "connection":
        option = value.lower()
        if option not in ("keep-alive", "close"):
            return False
        submission.close = option == "close"
    return lower not in _REFUSED_FIELDS


class FastPath(asyncio.Protocol):
    """One client connection, served here until a request needs aiohttp."""

    def __init__(self, front: FastFront) -> None:
        self._front = front
        self._loop = front.loop
        self._buffer = bytearray()
        self._busy = False  # a request is being served; later bytes wait in _buffer
        self._paused = False  # reading, while too much waits in _buffer
        self._closed = False
        self._peer = ""
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, (list, tuple)) else ""
        self._front.connections.add(self)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next()
        elif len(self._buffer) > _PAUSE_AT and not self._paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._paused = True

    @property
    def idle(self) -> bool:
        return not self._busy

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    def _next(self) -> None:
        """Serve the request at the start of the buffer, or hand over."""
        if not self._buffer:
            return
        if self._front.closing:
            self.close()
            return
        end = self._buffer.find(_HEAD_END)
        if end < 0:
            self._hand_over()
            return
        config = self._front.config
        submission = parse(bytes(self._buffer[:end]), config.max_header_size, config.max_body_size)
        start = end + len(_HEAD_END)
        if submission is None or len(self._buffer) - start < submission.length:
            # not for here, or its body is still coming (aiohttp reads it, with its timeouts)
            self._hand_over()
            return
        if submission.length:
            submission.body = bytes(self._buffer[start : start + submission.length])
        del self._buffer[: start + submission.length]
        self._front.metrics["fast_path_requests_total"] += 1
        self._busy = True
        self._loop.create_task(self._serve(submission))

    async def _serve(self, submission: Submission) -> None:
        try:
            response = await self._answer(submission)
        except Exception:
            log.exception("error serving %s %s", submission.method, submission.target)
            response = web.Response(status=500)
            submission.close = True
        close = submission.close or self._front.closing
        if not self._closed:
            assert self.transport is not None
            self.transport.write(encode(response, close=close))
            if close:
                self.transport.close()
        self._busy = False
        self._idle()
        if self._closed:
            return
        if self._paused:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        self._next()

    async def _answer(self, submission: Submission) -> web.Response:
        app = self._front.app
        if submission.mode is None:
            return await self._job_api(submission)
        verified = await admit(app, submission.authorization, submission.target)
        if isinstance(verified, web.Response):
            return verified
        headers = forwarded(
            submission.headers,
            peer=self._peer,
            secure=self._front.secure,
            host=submission.host,
            drop=NOT_STORED,
        )
        return await accept(
            app,
            submission.mode,
            verified,
            method=submission.method,
            target=submission.target,
            headers=headers,
            body=submission.body,
        )

    async def _job_api(self, submission: Submission) -> web.Response:
        """As `jobs_api.handle` answers a request without x-arango-async."""
        app = self._front.app
        suffixes = jobs_api.suffixes_of(submission.target)
        assert suffixes is not None  # parse() took it as the job API
        verified = await app[VERIFIER].caller_of(submission.authorization, submission.target)
        if isinstance(verified, web.Response):
            return verified
        query = URL(submission.target, encoded=True).query  # as aiohttp's request.query
        return await jobs_api.answer(app, submission.method, suffixes, query, verified.viewer)

    def _hand_over(self) -> None:
        """aiohttp serves this connection from here on, from the buffer's first byte."""
        assert self.transport is not None
        self._front.metrics["connections_handed_over_total"] += 1
        self._front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        handler = self._front.aiohttp_protocol()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        handler.data_received(data)

    def _idle(self) -> None:
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(
                self._idle_since + self._front.config.idle_timeout, self._check_idle
            )

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._closed:
            return
        due = self._idle_since + self._front.config.idle_timeout
        if not self._busy and self._loop.time() >= due:
            self.close()
        else:
            self._idle_timer = self._loop.call_at(
                max(due, self._loop.time() + 0.001), self._check_idle
            )


class Listener:
    """The proxy's listening socket and the aiohttp runner behind it; every
    connection starts on the fast path."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None) -> None:
        self.app = app
        self._ssl = ssl_context
        self._runner = web.AppRunner(app, handle_signals=False, **runner_options(app[CONFIG]))
        self._server: asyncio.Server | None = None
        self._front: FastFront | None = None

    async def start(self) -> None:
        """Start the application (store, dispatcher, ...), then listen. A failure on
        the way closes what was started (`stop` need not be called)."""
        try:
            await self._runner.setup()
            assert self._runner.server is not None
            self._front = FastFront(self.app, self._runner.server, secure=self._ssl is not None)
            config = self.app[CONFIG].server
            self._server = await asyncio.get_running_loop().create_server(
                self._front, config.host, config.port, ssl=self._ssl, backlog=128
            )
        except BaseException:
            await self._runner.cleanup()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self._server is not None
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def stop(self) -> None:
        """Stop listening, let requests under way finish within server.shutdown_grace,
        then stop the application (see `proxy.app`)."""
        if self._server is not None and self._front is not None:
            self._server.close()
            clock = self.app[SHUTDOWN]
            clock.begin()  # the grace counts from here, as from aiohttp's own stop
            await self._front.shutdown(clock.remaining())
        await self._runner.cleanup()


class FastFront:
    """Makes a `FastPath` per connection, and stops them."""

    def __init__(
        self,
        app: web.Application,
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        *,
        secure: bool,
    ) -> None:
        self.app = app
        self.config = app[CONFIG].server
        self.metrics = app[METRICS]
        self.aiohttp_protocol = aiohttp_protocol
        self.secure = secure
        self.loop = asyncio.get_running_loop()
        self.connections: set[FastPath] = set()
        self.closing = False

    def __call__(self) -> FastPath:
        return FastPath(self)

    async def shutdown(self, grace: float) -> None:
        """No new requests here; idle connections close at once, busy ones after
        their answer; waits at most `grace` seconds for those."""
        self.closing = True
        deadline = self.loop.time() + grace
        while True:
            for connection in list(self.connections):
                if connection.idle:
                    connection.close()
            if not self.connections or self.loop.time() >= deadline:
                return
            await asyncio.sleep(0.01)


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date  # noqa: PLW0603 - a one-entry cache, as aiohttp keeps its own
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def encode(response: web.Response, *, close: bool) -> bytes:
    """`response` as aiohttp sends it to an HTTP/1.1 request (not HEAD)."""
    body = response.body or b""
    assert isinstance(body, bytes)
    headers = response.headers
    lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
    lines.extend(
        f"{name}: {value}\r\n"
        for name, value in headers.items()
        if name.lower() != "content-length"
    )
    if response.status in (204, 304) or response.status < 200:
        body = b""  # a status that has no body has no length either
    else:
        lines.append(f"Content-Length: {len(body)}\r\n")
        if body and "Content-Type" not in headers:
            lines.append("Content-Type: application/octet-stream\r\n")
    if "Date" not in headers:
        lines.append(f"Date: {_http_date()}\r\n")
    if "Server" not in headers:
        lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
    if close and "Connection" not in headers:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8") + body

"""A lean HTTP/1.1 client for the proxy's own whole-body exchanges with ArangoDB.

Every job costs the proxy at least two requests of its own (submit, fetch), and
aiohttp's client spends about 80 us of CPU on each (measured on these machines;
a protocol on httptools, the llhttp parser Node.js uses, about 11 us). On two
cores that CPU comes straight out of accepts and harvests. So `Upstream.call`
uses this: a pool of keep-alive connections, each request written with one
send, the response parsed by httptools and returned whole. Pass-through, which
streams, stays on aiohttp.

What it does not do, by design: HEAD (a HEAD response announces a body that is
not sent, and the parser cannot be told; `Upstream.call` sends HEAD through
aiohttp), streaming, redirects, decompression (the proxy forwards bytes as they
are), 101 upgrades. A 1xx informational response before the real one is skipped.

Timeouts: `connect_timeout` for the TCP (and TLS) set-up; `read_timeout` bounds
the whole response, from the request's send to its last byte: a server that
trickles bytes cannot hold an exchange (and the harvester's fetch slot) longer
than one that is silent.
A connection that ArangoDB closed while idle is noticed (connection_lost) and
not used again; one idle for IDLE_LIMIT seconds is closed by the proxy first.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import cast

import httptools
from multidict import CIMultiDict

IDLE_LIMIT = 30.0  # seconds: an idle connection older than this is not reused (closed)

Response = tuple[int, CIMultiDict[str], bytes]


class ConnectionClosedError(ConnectionError):
    """ArangoDB closed the connection before its response was complete."""


class ResponseParseError(ConnectionError):
    """ArangoDB's response was not valid HTTP/1.1."""


class ConnectTimeout(ConnectionError):
    """No connection to ArangoDB within the connect timeout: unreachable, not slow."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []
        self._to_eof = False  # the body in progress has no length: it ends at EOF

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseParseError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._to_eof and exc is None:
            self.on_message_complete()  # a body without a length ends with the connection
        self._fail(ConnectionClosedError(f"ArangoDB closed the connection ({exc or 'EOF'})"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A response nobody asked for (bytes beyond the last reply, or sent while
            # idle): the connection is out of step, and the next request on it would
            # read this one's answer. Never reused (the exchange under way, if any,
            # got its answer already).
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._to_eof = (
            status >= 200
            and status not in (204, 304)
            and "content-length" not in self._headers
            and "chunked" not in self._headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, body = self._headers, b"".join(self._body)
        self._headers, self._body, self._to_eof = CIMultiDict(), [], False
        if 100 <= status < 200:
            return  # informational (100 Continue, 103 Early Hints): the response follows
        if not self._parser.should_keep_alive():
            self.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, headers, body))

    # -- the exchange ----------------------------------------------------------------------

    async def exchange(self, request: bytes, read_timeout: float) -> Response:
        assert self.transport is not None
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(read_timeout, self._expire, waiter)
        try:
            self.transport.write(request)
            return await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:  # not answered (cancelled, failed): unusable now
                self._waiter = None
                self.close()

    def _expire(self, waiter: asyncio.Future[Response]) -> None:
        if self._waiter is waiter:
            self._fail(TimeoutError())
            self.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Http1Pool:
    """Keep-alive connections to one host; `request` returns a whole response."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
    ) -> None:
        self._host = host
        self._port = port
        self._host_header = host if ":" not in host else f"[{host}]"
        if (port, ssl_context is None) not in ((80, True), (443, False)):
            self._host_header += f":{port}"
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[_Connection] = []
        # at most `limit` connections open: a new one is made only with none idle,
        # so in use (counted here) and idle together stay within it
        self._slots = asyncio.Semaphore(limit)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None = None,
    ) -> Response:
        """Raises OSError (ConnectionError, ssl.SSLError) or TimeoutError on failure."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            body = body or b""
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        request = "".join(lines).encode("utf-8", "surrogateescape")
        if body:
            request += body
        loop = asyncio.get_running_loop()
        async with self._slots:
            connection = self._idle_connection(loop) or await self._connect(loop)
            response = await connection.exchange(request, self._read_timeout)
            self._release(connection, loop)
        return response

    def _idle_connection(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and loop.time() - connection.idle_since < IDLE_LIMIT:
                return connection
            connection.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection within {self._connect_timeout:g} s") from exc
        return protocol

    def _release(self, connection: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        if connection.closed:
            connection.close()
            return
        connection.idle_since = loop.time()
        self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

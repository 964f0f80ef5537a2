"""The lean HTTP/1.1 client (`proxy.http1`) against a raw socket server that says
exactly what each test needs: framing, keep-alive, closes, silence, garbage."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamFailure
from proxy.http1 import ConnectionClosedError, Http1Pool, ResponseParseError
from proxy.upstream import Upstream

# A handler gets the request's head and body and the writer; it answers (or not).
Handler = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    port: int
    handler: Handler
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                await self.handler(head, body, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


StartServer = Callable[[Handler], Awaitable[RawServer]]


@pytest.fixture
async def raw_server() -> AsyncIterator[StartServer]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> RawServer:
        raw = RawServer(0, handler)
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
        raw.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return raw

    yield start
    for server in servers:
        server.close()


def answer(response: bytes) -> Handler:
    async def handler(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(response)

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seen: yes\r\n\r\nok"


def pool(port: int, *, read_timeout: float = 5.0, limit: int = 10) -> Http1Pool:
    return Http1Pool(
        "127.0.0.1",
        port,
        ssl_context=None,
        connect_timeout=1.0,
        read_timeout=read_timeout,
        limit=limit,
    )


async def test_a_request_is_sent_as_given_and_the_connection_kept(raw_server: StartServer) -> None:
    server = await raw_server(answer(OK))
    client = pool(server.port)
    headers = [("x-arango-async", "store"), ("X-Name", "Grüße")]
    for _ in range(3):
        status, got, body = await client.request("PUT", "/_db/a/_api/x?y=1", headers, b"{}")
        assert (status, got["x-seen"], body) == (200, "yes", b"ok")
    assert server.connections == 1
    assert (
        server.requests[0]
        == (
            f"PUT /_db/a/_api/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "x-arango-async: store\r\nX-Name: Grüße\r\nContent-Length: 2\r\n\r\n{}"
        ).encode()
    )
    status, _, _ = await client.request("GET", "/_api/job/done", [])
    assert b"Content-Length" not in server.requests[-1]  # a GET without a body has none
    client.close()


async def test_chunked_bodies_and_informational_responses(raw_server: StartServer) -> None:
    server = await raw_server(
        answer(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        )
    )
    client = pool(server.port)
    for _ in range(2):  # the connection stays usable after a chunked body
        status, headers, body = await client.request("POST", "/", [], b"x")
        assert (status, body, headers["transfer-encoding"]) == (201, b"abcdefg", "chunked")
    assert server.connections == 1
    client.close()


async def test_connection_close_and_a_body_up_to_the_end(raw_server: StartServer) -> None:
    async def close_after(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    server = await raw_server(close_after)
    client = pool(server.port)
    for _ in range(2):
        assert await client.request("GET", "/", []) == (
            200,
            CIMultiDict(Connection="close"),
            b"all of it",
        )
    assert server.connections == 2  # not reused
    client.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    raw_server: StartServer,
) -> None:
    server = await raw_server(answer(OK))
    client = pool(server.port)
    await client.request("GET", "/", [])
    server.writers[0].close()  # the server's keep-alive timeout
    await asyncio.sleep(0.05)
    assert (await client.request("GET", "/", []))[0] == 200
    assert server.connections == 2
    client.close()


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", ConnectionClosedError),
        (b"", ConnectionClosedError),
        (b"SMTP ready\r\n\r\n", ResponseParseError),
    ],
)
async def test_broken_responses_fail_the_request(
    raw_server: StartServer, response: bytes, error: type[Exception]
) -> None:
    async def then_close(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await raw_server(then_close)
    client = pool(server.port)
    with pytest.raises(error):
        await client.request("GET", "/", [])
    assert client._idle == []


@pytest.mark.parametrize("pace", [None, 0.05], ids=["silent", "trickling"])
async def test_a_response_not_complete_within_the_timeout_fails_and_its_connection_goes(
    raw_server: StartServer, pace: float | None
) -> None:
    # A byte every 50 ms used to restart the timer: a server trickling its answer
    # held the exchange (and the harvester's fetch) for as long as it liked.
    async def slow(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(pace or 5)
            writer.write(b"x")
            await writer.drain()

    server = await raw_server(slow)
    client = pool(server.port, read_timeout=0.25)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await client.request("GET", "/", [])
    assert asyncio.get_running_loop().time() - started < 2.0  # the trickle takes 5 s
    assert client._idle == []


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(
    raw_server: StartServer,
) -> None:
    async def never(_head: bytes, _body: bytes, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await raw_server(never)
    client = pool(server.port)
    request = asyncio.ensure_future(client.request("GET", "/", []))
    await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert client._idle == []


async def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        await pool(1).request("GET", "/", [("X-Evil", "a\r\nInjected: yes")])


async def test_upstream_maps_failures_to_arango_errors(raw_server: StartServer) -> None:
    async def never(_head: bytes, _body: bytes, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await raw_server(never)
    upstream = Upstream(UpstreamConfig(url=f"http://127.0.0.1:{server.port}", request_timeout=0.2))
    await upstream.start()
    try:
        with pytest.raises(UpstreamFailure) as timeout:
            await upstream.call("GET", "/_api/version", CIMultiDict())
        assert timeout.value.status == 504
    finally:
        await upstream.close()
    refused = Upstream(UpstreamConfig(url="http://127.0.0.1:1"))
    await refused.start()
    try:
        with pytest.raises(UpstreamFailure) as unreachable:
            await refused.call("GET", "/_api/version", CIMultiDict())
        assert unreachable.value.status == 503
        assert "unreachable" in unreachable.value.message
    finally:
        await refused.close()


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port where connections are never accepted: its backlog is full, so the
    kernel drops new SYNs and a connect waits (as for a host down or cut off)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in (*fillers, listener):
        sock.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"], ids=["lean client", "aiohttp's"])
async def test_no_connection_within_the_connect_timeout_is_unreachable_not_slow(
    unanswered_port: int, method: str
) -> None:
    """503, as README promises (and python-arango fails over on a 503, not a 504)."""
    upstream = Upstream(
        UpstreamConfig(url=f"http://127.0.0.1:{unanswered_port}", connect_timeout=0.2)
    )
    await upstream.start()
    try:
        with pytest.raises(UpstreamFailure) as failure:
            await upstream.call(method, "/_api/version", CIMultiDict())
    finally:
        await upstream.close()
    assert failure.value.status == 503
    assert "unreachable" in failure.value.message


async def test_never_more_connections_than_the_limit(raw_server: StartServer) -> None:
    """upstream.pool_size: requests beyond it wait for a connection to be free."""
    server = await raw_server(answer(OK))
    client = pool(server.port, limit=2)
    answers = await asyncio.gather(*(client.request("GET", "/", []) for _ in range(6)))
    assert [status for status, _, _ in answers] == [200] * 6
    assert server.connections == 2
    assert len(client._idle) == 2
    client.close()
    assert client._idle == []


async def test_a_connection_with_bytes_beyond_its_answer_is_never_reused(
    raw_server: StartServer,
) -> None:
    """An upstream that sends more than the answer (here the head of a second one):
    the next request must not read those bytes as its own answer."""
    sent = 0

    async def handler(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        sent += 1
        if sent == 1:
            writer.write(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    server = await raw_server(handler)
    client = pool(server.port)
    assert (await client.request("GET", "/", []))[2] == b"ok"
    await asyncio.sleep(0.05)
    assert (await client.request("GET", "/", []))[2] == b"second"
    assert server.connections == 2
    client.close()

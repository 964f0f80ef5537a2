"""The fast path (proxy/fastpath.py): what it takes, what it hands to aiohttp, and
that a client cannot tell the two apart.

Each comparison sends the same bytes twice: on a fresh connection, where the fast
path takes them, and on a connection that aiohttp already serves (handed over by
a first request to /_proxy/health). The proxy's metrics say which path answered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.app import create_app
from proxy.arango_headers import ArangoHeaders
from proxy.early202 import Early202
from proxy.fastpath import FastFront, FastPath
from proxy.fastpath_http import Submission, accepted_head, http_date, parse
from proxy.listener import Listener
from proxy.state import METRICS, STORE, VERIFIER
from storage import JobMode, JobState, NewJob, StoreError
from tests.conftest import proxy_config
from tests.standin import StandIn
from tests.standin.client import eventually
from tests.test_http1 import StartServer, answer, raw_server  # noqa: F401 (a fixture)
from tests.test_passthrough import TRICKLE_PARTS, TRICKLED, echo_app

Serve = Callable[[web.Application], Awaitable[str]]

AUTH = b"Authorization: Basic " + base64.b64encode(b"alice:alicepw") + b"\r\n"
WRONG = b"Authorization: Basic " + base64.b64encode(b"alice:wrong") + b"\r\n"
HEALTH = b"GET /_proxy/health HTTP/1.1\r\nHost: p\r\n\r\n"
SLEEPY = json.dumps({"query": "RETURN SLEEP(3)"}).encode()


def req(line: bytes, *fields: bytes, body: bytes = b"") -> bytes:
    """A request: `line`, Host, `fields` (each with its CRLF), Content-Length if a body."""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return line + b"\r\nHost: p\r\n" + b"".join(fields) + length + b"\r\n" + body


STORE_MODE = b"x-arango-async: store\r\n"
FORGET_MODE = b"x-arango-async: true\r\n"
VERSION = b"PUT /_api/version HTTP/1.1"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """The answer, in order, with blanks for the values that differ between two
        answers by nature: the date, the job id, ArangoDB's queue time."""
        varying = {"date", "x-arango-async-id", "x-arango-queue-time-seconds"}
        headers = [(k, "" if k.lower() in varying else v) for k, v in self.headers]
        return self.status, headers, self.body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> Connection:
        url = URL(base)
        assert url.host is not None
        assert url.port is not None
        return cls(*await asyncio.open_connection(url.host, url.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, head: bool = False) -> Answer:
        """The next answer (`head`: to a HEAD request, so without a body); a chunked
        body as it came, chunk lines included."""
        block = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = block[:-4].decode("latin-1").split("\r\n")
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines)]
        found = dict((k.lower(), v) for k, v in headers)
        if head:
            body = b""
        elif found.get("transfer-encoding") == "chunked":
            body = b""
            while not body.endswith(b"0\r\n\r\n"):
                body += await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10)
        else:
            length = int(found.get("content-length", "0"))
            body = await asyncio.wait_for(self.reader.readexactly(length), 10)
        return Answer(int(status_line.split(" ")[1]), headers, body)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


async def exchange(base: str, data: bytes, *, aiohttp_first: bool = False) -> Answer:
    connection = await Connection.open(base)
    try:
        if aiohttp_first:
            await connection.send(HEALTH)
            assert (await connection.answer()).status == 200
        await connection.send(data)
        return await connection.answer(head=data.startswith(b"HEAD "))
    finally:
        connection.close()


def hold_writer(app: web.Application) -> tuple[threading.Event, asyncio.Future[bool]]:
    """Keep the store's writer thread busy until the event is set (then the future is
    done): writes queue meanwhile."""
    release = threading.Event()
    return release, app[STORE]._writer.call(lambda _conn: release.wait())


async def jobs_accepted(app: web.Application, count: int) -> None:
    """Until the intake has counted `count` jobs (an early 202 can reach the client
    before the event loop hears of the commit)."""
    for _ in range(500):
        if app[METRICS]["jobs_accepted_total"] == count:
            return
        await asyncio.sleep(0.01)
    assert app[METRICS]["jobs_accepted_total"] == count


async def an_accept_waits(app: web.Application) -> None:
    """Until a new job's write waits in the store's writer queue (behind `hold_writer`;
    other writes, of jobs sent or harvested, may be queued too)."""
    for _ in range(500):
        if app[STORE]._queued_accepts:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no new job was queued")


@pytest.fixture
async def proxy(
    standin: StandIn, serve_proxy: Serve, tmp_path: Path
) -> tuple[web.Application, str]:
    app = create_app(proxy_config(standin.url, tmp_path / "data"))
    return app, await serve_proxy(app)


SAME_ANSWERS = {
    "store job": req(VERSION, AUTH, STORE_MODE, body=b"{}"),
    "fire-and-forget job": req(VERSION, AUTH, FORGET_MODE),
    "job, unknown database": req(b"PUT /_db/nope/_api/version HTTP/1.1", AUTH, STORE_MODE),
    "job, wrong password": req(VERSION, WRONG, STORE_MODE),
    "job, closing": req(VERSION, AUTH, STORE_MODE, b"Connection: close\r\n"),
    "job, close then keep-alive": req(
        VERSION, AUTH, STORE_MODE, b"Connection: close\r\nConnection: keep-alive\r\n"
    ),
    "job, two credentials, the first valid": req(VERSION, AUTH, WRONG, STORE_MODE),
    "job, two credentials, the first wrong": req(VERSION, WRONG, AUTH, STORE_MODE),
    "job list": req(b"GET /_api/job/pending HTTP/1.1", AUTH),
    "job list, count": req(b"GET /_api/job/done?count=0 HTTP/1.1", AUTH),
    "job list, another database": req(b"GET /_db/_system/_admin/job/done HTTP/1.1", AUTH),
    "unknown job": req(b"PUT /_api/job/123456 HTTP/1.1", AUTH),
    "job API, unknown method": req(b"PATCH /_api/job/1 HTTP/1.1", AUTH),
    "job API, no credentials": req(b"GET /_api/job/done HTTP/1.1"),
    "expired, no stamp": req(b"DELETE /_api/job/expired HTTP/1.1", AUTH),
    "pass-through": req(b"GET /_api/version?details=true HTTP/1.1", AUTH),
    "pass-through with a body": req(b"PUT /_api/version HTTP/1.1", AUTH, body=b'{"a":1}'),
    "pass-through, not found": req(b"DELETE /_api/collection/none HTTP/1.1", AUTH),
    "pass-through, no credentials": req(b"GET /_api/version HTTP/1.1"),
    "pass-through, closing": req(b"GET /_api/version HTTP/1.1", AUTH, b"Connection: close\r\n"),
    "pass-through, Proxy-Connection: close": req(
        b"GET /_api/version HTTP/1.1", AUTH, b"Proxy-Connection: close\r\n"
    ),
    "job, Proxy-Connection: close": req(VERSION, AUTH, STORE_MODE, b"Proxy-Connection: close\r\n"),
    "pass-through, keep-alive then close": req(
        b"GET /_api/version HTTP/1.1", AUTH, b"Connection: keep-alive\r\nConnection: close\r\n"
    ),
    "HEAD job": req(b"HEAD /_api/version HTTP/1.1", AUTH, STORE_MODE),
    "HEAD for the job API": req(b"HEAD /_api/job/1 HTTP/1.1", AUTH),
    "HEAD passed through": req(b"HEAD /_api/version HTTP/1.1", AUTH),
    "OPTIONS, never queued": req(b"OPTIONS /_api/version HTTP/1.1", AUTH, STORE_MODE),
    "OPTIONS for the job API": req(b"OPTIONS /_api/job/1 HTTP/1.1", AUTH),
}


@pytest.mark.parametrize("case", list(SAME_ANSWERS))
async def test_both_paths_give_the_same_answer(
    proxy: tuple[web.Application, str], case: str
) -> None:
    """The fast path's answer with credentials not known yet (verified in a task),
    then known (answered at once where it can), and aiohttp's."""
    app, base = proxy
    metrics = app[METRICS]
    raw = SAME_ANSWERS[case]
    fast = await exchange(base, raw)
    assert metrics["fast_path_requests_total"] == 1
    assert metrics["connections_handed_over_total"] == 0
    through_aiohttp = await exchange(base, raw, aiohttp_first=True)
    assert metrics["fast_path_requests_total"] == 1
    assert metrics["connections_handed_over_total"] == 1
    known = await exchange(base, raw)
    assert fast.comparable() == through_aiohttp.comparable() == known.comparable()
    assert (fast.header("x-arango-async-id") is None) == (
        through_aiohttp.header("x-arango-async-id") is None
    )


async def test_a_fetched_result_and_a_pending_job_answer_alike(
    proxy: tuple[web.Application, str],
) -> None:
    """204 (pending: no length, no body) and a replayed result, on both paths."""
    app, base = proxy
    answers: dict[str, list[Answer]] = {"pending": [], "fetched": []}
    for aiohttp_first in (False, True):
        connection = await Connection.open(base)
        if aiohttp_first:
            await connection.send(HEALTH)
            await connection.answer()
        for sleeping in (True, False):
            body = SLEEPY if sleeping else b""
            target = b"POST /_api/cursor HTTP/1.1" if sleeping else VERSION
            await connection.send(req(target, AUTH, STORE_MODE, body=body))
            job_id = (await connection.answer()).header("x-arango-async-id")
            assert job_id is not None
            fetch = req(b"PUT /_api/job/" + job_id.encode() + b" HTTP/1.1", AUTH)
            while True:
                await connection.send(fetch)
                answer = await connection.answer()
                if sleeping or answer.status != 204:
                    break
                await asyncio.sleep(0.01)
            answers["pending" if sleeping else "fetched"].append(answer)
        connection.close()
    assert answers["pending"][0].status == 204
    assert answers["pending"][0].header("content-length") is None
    assert answers["fetched"][0].status == 200
    assert answers["fetched"][0].header("x-arango-async-id") is not None
    for kind, (fast, through_aiohttp) in answers.items():
        assert fast.comparable() == through_aiohttp.comparable(), kind
    assert app[METRICS]["fast_path_requests_total"] >= 4


async def test_a_job_is_stored_alike_on_both_paths(proxy: tuple[web.Application, str]) -> None:
    app, base = proxy
    note = b"X-Note: \t a  b \t\r\nX-Empty:\r\n"
    raw = req(b"POST /_api/cursor?x=1 HTTP/1.1", AUTH, STORE_MODE, note, body=SLEEPY)
    stored = []
    for aiohttp_first in (False, True):
        answer = await exchange(base, raw, aiohttp_first=aiohttp_first)
        job_id = answer.header("x-arango-async-id")
        assert job_id is not None
        job = await app[STORE].get(int(job_id), None)  # running for 3 s: not done yet
        assert job is not None
        stored.append(job)
    fast, through_aiohttp = stored
    assert app[METRICS]["fast_path_requests_total"] == 1
    assert fast.headers == through_aiohttp.headers
    assert ("X-Note", "a  b") in fast.headers
    assert ("X-Empty", "") in fast.headers
    assert fast.body == through_aiohttp.body == SLEEPY
    for field in ("mode", "user", "database", "method", "target", "auth"):
        assert getattr(fast, field) == getattr(through_aiohttp, field), field


HANDED_OVER = {
    # (request, the answer's status from aiohttp's path)
    "x-arango-async of another case": (req(VERSION, AUTH, b"x-arango-async: Store\r\n"), 200),
    "x-arango-async twice": (req(VERSION, AUTH, STORE_MODE, STORE_MODE), 202),
    "a method llhttp does not know": (req(b"FOO /_api/version HTTP/1.1", AUTH, STORE_MODE), 400),
    "a character RFC 3986 does not allow": (
        req(b"PUT /_api/version?a=<b> HTTP/1.1", AUTH, STORE_MODE),
        202,
    ),
    "Content-Length of 5,000 digits": (
        req(VERSION, AUTH, STORE_MODE, b"Content-Length: " + b"9" * 5000 + b"\r\n"),
        400,
    ),
    "HTTP/1.0": (VERSION[:-1] + b"0\r\nHost: p\r\n" + AUTH + STORE_MODE + b"\r\n", 202),
    "no Host": (VERSION + b"\r\n" + AUTH + STORE_MODE + b"\r\n", 400),
    "percent-escape in the path": (req(b"PUT /_api/%76ersion HTTP/1.1", AUTH, STORE_MODE), 202),
    "double slash": (req(b"PUT //_api/version HTTP/1.1", AUTH, STORE_MODE), 202),
    "dot segment": (req(b"PUT /_api/x/../version HTTP/1.1", AUTH, STORE_MODE), 202),
    "the proxy's own route": (req(b"GET /_proxy/health HTTP/1.1", STORE_MODE), 200),
    "chunked body": (
        req(VERSION, AUTH, STORE_MODE, b"Transfer-Encoding: chunked\r\n") + b"2\r\n{}\r\n0\r\n\r\n",
        202,
    ),
    "Expect": (req(VERSION, AUTH, STORE_MODE, b"Expect: 100-continue\r\n"), 100),
    # ArangoDB ignores an expectation it does not know (aiohttp would answer 417)
    "Expect of another kind": (req(VERSION, AUTH, STORE_MODE, b"Expect: foo\r\n"), 202),
    "Connection: upgrade": (
        req(VERSION, AUTH, STORE_MODE, b"Connection: upgrade\r\nUpgrade: h2c\r\n"),
        202,
    ),
    "Content-Length twice": (
        req(VERSION, AUTH, STORE_MODE, b"Content-Length: 2\r\nContent-Length: 2\r\n") + b"{}",
        400,
    ),
    "non-ASCII header value": (req(VERSION, AUTH, STORE_MODE, "X-N: é\r\n".encode()), 202),
    "space before a colon": (req(VERSION, AUTH, STORE_MODE, b"X-N : 1\r\n"), 400),
    "oversize header fields": (
        req(VERSION, AUTH, STORE_MODE, b"X-B: " + b"b" * 70_000 + b"\r\n"),
        431,
    ),
    "body over the limit": (
        req(VERSION, AUTH, STORE_MODE, b"Content-Length: 99999999999\r\n"),
        413,
    ),
    "request line over 8 KiB": (req(b"PUT /_api/version?" + b"a" * 9000 + b" HTTP/1.1", AUTH), 400),
    # a browser's: the proxy's own answers to it carry CORS headers (proxy.cors)
    "Origin": (req(VERSION, AUTH, STORE_MODE, b"Origin: http://app\r\n"), 202),
    "Origin, passed through": (req(b"OPTIONS /anything HTTP/1.1", b"Origin: http://x\r\n"), 200),
}


# Header fields as clients write them, and as they should not: names that are
# tokens or not, the fields the fast path reads in any case, separators with spaces
# and tabs around values that hold them too, and characters outside printable ASCII.
_NAMES = st.sampled_from(
    ["Host", "host", "x-arango-async", "X-Arango-Async", "Content-Length", "Connection",
     "Authorization", "Transfer-Encoding", "Expect", "Upgrade", "Origin", "x-omit-www-authenticate",
     "x-arango-queue-time-seconds", "X-N", "a", "bad name", "x:y", "", "é"]
)  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(["store", "true", " store", "12", "0", "close", "keep-alive", "Upgrade"]),
    st.text(alphabet=" \t!~aZ0:é\x7f\x01", max_size=8),
)
_FIELD = st.tuples(_NAMES, st.sampled_from([": ", ":", " : ", ":\t", ": \t "]), _VALUES)


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(
    st.sampled_from(["PUT /_api/version", "GET /_api/job/7", "POST /_db/d/_api/cursor?x=1"]),
    st.lists(_FIELD, max_size=7),
    st.booleans(),
)
def test_what_the_fast_path_takes_it_reads_as_aiohttp_does(
    line: str, fields: list[tuple[str, str, str]], host: bool
) -> None:
    """`parse` takes a request only if aiohttp's own parser (llhttp) reads the same
    method, target and fields (names and values, in order) from it."""
    head = "\r\n".join([f"{line} HTTP/1.1"] + (["Host: h"] if host else []))
    head += "".join(f"\r\n{name}{colon}{value}" for name, colon, value in fields)
    raw = head.encode()
    taken = parse(raw, 65536, 1 << 30)
    if taken is None:
        return
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(None, loop, 65536)
        [(message, _)], _, _ = parser.feed_data(raw + b"\r\n\r\n")
    finally:
        loop.close()
    assert (taken.method, taken.target) == (message.method, message.path)
    assert taken.headers == [
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in message.raw_headers
    ]
    assert taken.host == message.headers["Host"]


@pytest.mark.parametrize("case", list(HANDED_OVER))
async def test_what_the_fast_path_hands_to_aiohttp(
    proxy: tuple[web.Application, str], case: str
) -> None:
    app, base = proxy
    raw, status = HANDED_OVER[case]
    connection = await Connection.open(base)
    await connection.send(raw)
    assert (await connection.answer()).status == status
    connection.close()
    assert app[METRICS]["fast_path_requests_total"] == 0
    assert app[METRICS]["connections_handed_over_total"] == 1


@pytest.mark.parametrize(
    ("body", "cut"),
    [(b'{"a":1}', 10), (b"b" * (1024 * 1024 + 1), 1000)],
    ids=["a head in parts", "a body over 1 MiB in parts (streams through aiohttp)"],
)
async def test_what_arrives_in_parts_is_handed_over(
    proxy: tuple[web.Application, str], body: bytes, cut: int
) -> None:
    app, base = proxy
    raw = req(VERSION, AUTH, STORE_MODE, body=body)
    connection = await Connection.open(base)
    await connection.send(raw[:cut])
    await asyncio.sleep(0.05)
    await connection.send(raw[cut:])
    assert (await connection.answer()).status == 202
    connection.close()
    assert app[METRICS]["fast_path_requests_total"] == 0
    assert app[METRICS]["connections_handed_over_total"] == 1


def http2_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each HTTP/2 frame in `data` (RFC 9113 4.1)."""
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        frames.append((data[3], stream, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


async def test_a_client_speaking_http2_at_once_is_told_http1_is_required(
    proxy: tuple[web.Application, str],
) -> None:
    """The preface of HTTP/2 with prior knowledge (arangodb-java-driver 7's default)
    and the client's first frames: the proxy's own preface (SETTINGS), then GOAWAY
    with HTTP_1_1_REQUIRED, in HTTP/2 that client reads, and it hangs up (having
    read the client's frames, so that no reset loses the GOAWAY)."""
    _, base = proxy
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    connection = await Connection.open(base)
    await connection.send(preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    await asyncio.sleep(0.05)
    await connection.send(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # SETTINGS ack
    reply = await asyncio.wait_for(connection.reader.read(), 10)  # (to the hang-up)
    connection.close()
    settings_frame, goaway = http2_frames(reply)
    assert settings_frame == (0x4, 0, b"")
    assert goaway[:2] == (0x7, 0)
    assert int.from_bytes(goaway[2][:4], "big") == 0  # no stream was processed
    assert int.from_bytes(goaway[2][4:8], "big") == 0xD  # HTTP_1_1_REQUIRED
    assert b"HTTP/1.1" in goaway[2][8:]


@pytest.mark.parametrize("part", [b"P", b"PRI * HTTP/2.0\r\n\r\n"])
async def test_part_of_an_http2_preface_goes_to_aiohttp_and_its_timers(
    proxy: tuple[web.Application, str], part: bytes
) -> None:
    """A client that stops half-way through a preface holds no connection for ever."""
    app, base = proxy
    connection = await Connection.open(base)
    await connection.send(part)
    await eventually(lambda: app[METRICS]["connections_handed_over_total"] == 1)
    connection.close()


async def test_a_body_that_arrives_in_parts_is_awaited(
    proxy: tuple[web.Application, str],
) -> None:
    app, base = proxy
    body = json.dumps({"query": "RETURN SLEEP(3)", "pad": "p" * 300_000}).encode()
    raw = req(b"POST /_api/cursor HTTP/1.1", AUTH, STORE_MODE, body=body)
    connection = await Connection.open(base)
    for part in (raw[:-200_000], raw[-200_000:-1000], raw[-1000:]):
        await connection.send(part)
        await asyncio.sleep(0.05)
    answer = await connection.answer()
    connection.close()
    assert answer.status == 202
    job = await app[STORE].get(int(answer.header("x-arango-async-id") or 0), None)
    assert job is not None
    assert job.body == body
    assert app[METRICS]["fast_path_requests_total"] == 1
    assert app[METRICS]["connections_handed_over_total"] == 0


async def test_a_late_body_of_a_normal_request_goes_on_in_aiohttp(
    standin: StandIn, serve_proxy: Serve, tmp_path: Path
) -> None:
    """Only an async body has a deadline (408); any other waits in aiohttp."""
    app = create_app(proxy_config(standin.url, tmp_path / "data", server={"body_timeout": 0.2}))
    base = await serve_proxy(app)
    raw = req(b"PUT /_api/version HTTP/1.1", AUTH, body=b'{"a":1}')
    connection = await Connection.open(base)
    await connection.send(raw[:-3])
    await asyncio.sleep(0.5)
    assert app[METRICS]["connections_handed_over_total"] == 1
    await connection.send(raw[-3:])
    answer = await connection.answer()
    connection.close()
    assert answer.status == 200
    assert app[METRICS]["fast_path_requests_total"] == 0


async def test_one_connection_moves_to_aiohttp_at_a_request_it_needs(
    proxy: tuple[web.Application, str],
) -> None:
    """Pipelined: two jobs for the fast path, one it hands over (a chunked body), a
    fourth; the hand-over starts at the third request's first byte."""
    app, base = proxy
    connection = await Connection.open(base)
    job = req(VERSION, AUTH, STORE_MODE, body=b"{}")
    chunked = req(VERSION, AUTH, STORE_MODE, b"Transfer-Encoding: chunked\r\n") + (
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    await connection.send(job + job + chunked + job)
    answers = [await connection.answer() for _ in range(4)]
    connection.close()
    assert [answer.status for answer in answers] == [202] * 4
    ids = [int(answer.header("x-arango-async-id") or 0) for answer in answers]
    assert ids == sorted(set(ids))
    assert ids[0] > 0
    assert app[METRICS]["fast_path_requests_total"] == 2
    assert app[METRICS]["connections_handed_over_total"] == 1


async def test_connection_close_is_honoured(proxy: tuple[web.Application, str]) -> None:
    _, base = proxy
    connection = await Connection.open(base)
    job = req(VERSION, AUTH, STORE_MODE, b"Connection: close\r\n")
    await connection.send(job + job)  # the second is never read
    answer = await connection.answer()
    assert answer.status == 202
    assert answer.header("connection") == "close"
    assert await connection.closed()
    connection.close()


async def test_a_client_that_leaves_still_has_its_job_stored(
    proxy: tuple[web.Application, str],
) -> None:
    app, base = proxy
    connection = await Connection.open(base)
    await connection.send(req(VERSION, AUTH, FORGET_MODE))
    connection.close()
    await jobs_accepted(app, 1)
    assert app[METRICS]["fast_path_requests_total"] == 1


async def test_an_idle_connection_is_closed_after_idle_timeout(
    standin: StandIn, serve_proxy: Serve, tmp_path: Path
) -> None:
    app = create_app(proxy_config(standin.url, tmp_path / "data", server={"idle_timeout": 0.3}))
    base = await serve_proxy(app)
    connection = await Connection.open(base)
    await connection.send(req(VERSION, AUTH, STORE_MODE))
    assert (await connection.answer()).status == 202
    started = asyncio.get_running_loop().time()
    assert await connection.closed()
    waited = asyncio.get_running_loop().time() - started
    connection.close()
    assert 0.2 < waited < 5
    assert app[METRICS]["connections_handed_over_total"] == 0


async def test_a_pipelined_flood_is_answered_in_full_and_in_order(
    proxy: tuple[web.Application, str],
) -> None:
    """Far more than the fast path buffers behind a request under way (it stops
    reading meanwhile): every job answered, ids in order. (A request the buffer holds
    only in part when its turn comes is handed over, with all that follows.)"""
    app, base = proxy
    count = 40  # 400 KB
    connection = await Connection.open(base)
    await connection.send(req(VERSION, AUTH, STORE_MODE, body=b"x" * 10_000) * count)
    ids = []
    for _ in range(count):
        answer = await connection.answer()
        assert answer.status == 202
        ids.append(int(answer.header("x-arango-async-id") or 0))
    connection.close()
    assert ids == sorted(set(ids))
    assert ids[0] > 0
    assert app[METRICS]["fast_path_requests_total"] >= 1
    await jobs_accepted(app, count)


INTERNAL_ERROR = {"code": 500, "error": True, "errorMessage": "internal error", "errorNum": 4}


async def test_a_failing_request_gets_a_500_and_the_connection_closes(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a task (credentials not known yet) and at once (known since); and on
    aiohttp's path (a chunked body goes there). ArangoDB's 500, errorNum 4."""
    app, base = proxy
    served = count_served(monkeypatch)

    def broken(*_args: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(app[STORE], "accept_nowait", broken)
    monkeypatch.setattr(app[STORE], "accept", broken)
    chunked = req(VERSION, AUTH, STORE_MODE, b"Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n"
    for request in (req(VERSION, AUTH, STORE_MODE), req(VERSION, AUTH, STORE_MODE), chunked):
        connection = await Connection.open(base)
        await connection.send(request)
        answer = await connection.answer()
        assert answer.status == 500
        assert answer.header("content-type") == "application/json; charset=utf-8"
        assert json.loads(answer.body) == INTERNAL_ERROR, request
        assert answer.header("connection") == "close"
        assert await connection.closed()
        connection.close()
    assert served == ["/_api/version"]  # the first, in a task
    assert app[METRICS]["connections_handed_over_total"] == 1  # the chunked one


async def test_accepts_with_known_credentials_need_no_task(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submissions pipelined behind one that verified their credentials are each
    handed to the store at once; their answers come back in order."""
    app, base = proxy
    served = count_served(monkeypatch)
    connection = await Connection.open(base)
    await connection.send(b"".join(req(VERSION, AUTH, STORE_MODE) for _ in range(20)))
    answers = [await connection.answer() for _ in range(20)]
    connection.close()
    assert [a.status for a in answers] == [202] * 20
    ids = [int(a.header("x-arango-async-id") or 0) for a in answers]
    assert ids == list(range(ids[0], ids[0] + 20))
    assert served == ["/_api/version"]  # the first: its credentials were checked
    await jobs_accepted(app, 20)


async def test_a_stop_closes_idle_connections_and_lets_requests_under_way_finish(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(proxy_config(standin.url, tmp_path / "data"))
    listener = Listener(app, None)
    await listener.start()
    host, port = listener.addresses[0]
    base = f"http://{host}:{port}"
    idle = await Connection.open(base)
    await idle.send(req(VERSION, AUTH, STORE_MODE))
    assert (await idle.answer()).status == 202
    store = app[STORE]
    accept_nowait = store.accept_nowait
    release = asyncio.Event()
    held = asyncio.Event()
    later: list[asyncio.Task[None]] = []

    def held_accept(
        job: NewJob, on_durable: Callable[[int], None] | None = None
    ) -> tuple[int, asyncio.Future[object]]:
        """The job goes to the store once `release` is set."""
        held.set()
        outer: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        async def accept() -> None:
            await release.wait()
            outer.set_result(await accept_nowait(job, on_durable)[1])

        later.append(asyncio.create_task(accept()))
        return store._next_id, outer

    monkeypatch.setattr(store, "accept_nowait", held_accept)
    busy = await Connection.open(base)
    await busy.send(req(VERSION, AUTH, STORE_MODE))
    await asyncio.wait_for(held.wait(), 10)
    stopping = asyncio.create_task(listener.stop())
    assert await idle.closed()  # at once: nothing under way on it
    await asyncio.sleep(0.1)
    assert not stopping.done()  # waits for the request under way
    release.set()
    answer = await busy.answer()
    assert answer.status == 202
    assert answer.header("connection") == "close"
    assert await busy.closed()
    await asyncio.wait_for(stopping, 10)
    idle.close()
    busy.close()


async def test_a_202_leaves_once_its_job_is_on_disk_even_while_the_loop_is_busy(
    proxy: tuple[web.Application, str],
) -> None:
    """The 202 is sent on the store's writer thread right after the commit: here the
    event loop is blocked from the commit until the answer has arrived."""
    app, base = proxy
    assert (await exchange(base, req(VERSION, AUTH, STORE_MODE))).status == 202  # verified
    await jobs_accepted(app, 1)
    release, held = hold_writer(app)
    url = URL(base)
    with socket.create_connection((url.host, url.port), timeout=5) as client:
        client.sendall(req(VERSION, AUTH, STORE_MODE))
        await an_accept_waits(app)
        release.set()
        answer = client.recv(4096)  # (blocking: no callback runs on the loop meanwhile)
    assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert b"x-arango-async-id: 2\r\n" in answer
    assert await held


async def test_a_202_the_kernel_takes_in_part_is_finished_by_the_loop(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, base = proxy
    write = os.write

    def partly(fd: int, data: bytes) -> int:
        return write(fd, data[:10] if data.startswith(b"HTTP/1.1 202") else data)

    monkeypatch.setattr(os, "write", partly)
    connection = await Connection.open(base)
    for mode in (STORE_MODE, FORGET_MODE, STORE_MODE):
        await connection.send(req(VERSION, AUTH, mode))
        answer = await connection.answer()
        assert answer.status == 202
        assert answer.header("content-length") == "0"
        assert (answer.header("x-arango-async-id") is None) == (mode == FORGET_MODE)
    connection.close()


def test_an_early_202_says_what_is_left_to_send() -> None:
    submission = Submission()
    submission.mode = JobMode.STORE
    arango = SimpleNamespace(arango_headers=ArangoHeaders())  # none learnt
    front = cast(FastFront, SimpleNamespace(closing=False, app={VERIFIER: arango}))
    whole = accepted_head(7, http_date(), close=False)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        early = Early202(ours.fileno(), submission, front)
        early(7)
        assert early.unsent == b""
        assert theirs.recv(4096) == whole
        ours.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                ours.send(b"x" * 65536)  # the kernel's buffer is full
        early = Early202(ours.fileno(), submission, front)
        early(7)
        assert early.unsent == whole
        theirs.close()
        early = Early202(ours.fileno(), submission, front)
        early(7)
        assert early.unsent == b""  # the client is gone: nothing left to send


async def test_the_socket_copies_for_early_202s_are_closed(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, base = proxy
    connections: list[FastPath] = []
    make = FastFront.__call__

    def recording(front: FastFront) -> FastPath:
        connections.append(make(front))
        return connections[-1]

    monkeypatch.setattr(FastFront, "__call__", recording)
    copies: set[int] = set()
    early_202 = FastPath._early_202

    def noting(self: FastPath, submission: Submission) -> Early202 | None:
        early = early_202(self, submission)
        copies.add(self._fd)
        return early

    monkeypatch.setattr(FastPath, "_early_202", noting)
    for _ in range(3):
        assert (await exchange(base, req(VERSION, AUTH, STORE_MODE))).status == 202
    await jobs_accepted(app, 3)
    # one leaves while its job commits: the copy stays open until the 202 went out
    release, held = hold_writer(app)
    leaving = await Connection.open(base)
    await leaving.send(req(VERSION, AUTH, STORE_MODE))
    await an_accept_waits(app)
    leaving.close()
    for _ in range(500):
        if all(connection._closed for connection in connections):
            break
        await asyncio.sleep(0.01)
    assert connections[-1]._fd >= 0  # closed, but its early 202 may still be under way
    release.set()
    assert await held
    await jobs_accepted(app, 4)
    assert len(connections) == 4
    assert all(connection._closed and connection._fd == -1 for connection in connections)
    assert len(copies - {-1}) >= 1


async def test_a_job_is_answered_202_when_no_socket_copy_can_be_made(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors for the early 202's copy of the socket: the job is
    stored and answered 202 by the event loop (it was a 500, the job not stored)."""
    app, base = proxy

    def no_descriptor(_fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "dup", no_descriptor)  # (the one os module fastpath uses)
    answer = await exchange(base, req(VERSION, AUTH, STORE_MODE))
    assert answer.status == 202
    assert answer.header("x-arango-async-id") is not None
    await jobs_accepted(app, 1)


@pytest.fixture
async def echo_proxy(
    serve_app: Serve, serve_proxy: Serve, tmp_path: Path
) -> tuple[web.Application, web.Application, str]:
    """(the echo upstream's app, the proxy's app, the proxy's URL)."""
    upstream = echo_app()
    app = create_app(proxy_config(await serve_app(upstream), tmp_path / "data"))
    return upstream, app, await serve_proxy(app)


PASSED_THROUGH = {
    "a request with a body, as it arrived": req(
        b"POST /anything?q=1 HTTP/1.1", b"X-Note: n\r\n", body=b"payload"
    ),
    "a chunked answer": req(b"GET /chunked HTTP/1.1"),
    "204": req(b"GET /status/204 HTTP/1.1"),
    "304": req(b"GET /status/304 HTTP/1.1"),
    "a status and reason of its own": req(b"GET /status/599 HTTP/1.1"),
    "cookies and hop-by-hop fields": req(b"GET /cookies HTTP/1.1"),
    "gzip untouched": req(b"GET /gzip HTTP/1.1", b"Accept-Encoding: gzip\r\n"),
    "a redirect, not followed": req(b"GET /redirect HTTP/1.1"),
    "3 MB streamed": req(b"GET /download?size=3000000 HTTP/1.1"),
    "HEAD with a length": req(b"HEAD /download?size=3000 HTTP/1.1"),
    "HEAD, chunked": req(b"HEAD /chunked HTTP/1.1"),
    "HEAD, 204": req(b"HEAD /status/204 HTTP/1.1"),
    "OPTIONS": req(b"OPTIONS /anything HTTP/1.1", b"Access-Control-Request-Method: PUT\r\n"),
}


@pytest.mark.parametrize("case", list(PASSED_THROUGH))
async def test_pass_through_answers_alike_on_both_paths(
    echo_proxy: tuple[web.Application, web.Application, str], case: str
) -> None:
    _, app, base = echo_proxy
    raw = PASSED_THROUGH[case]
    fast = await exchange(base, raw)
    through_aiohttp = await exchange(base, raw, aiohttp_first=True)
    assert app[METRICS]["fast_path_requests_total"] == 1
    assert app[METRICS]["connections_handed_over_total"] == 1
    assert fast.comparable() == through_aiohttp.comparable()


async def test_a_slow_reader_holds_the_stream_back_and_gets_it_all(
    echo_proxy: tuple[web.Application, web.Application, str],
) -> None:
    _, app, base = echo_proxy
    size = 16 * 1024 * 1024
    connection = await Connection.open(base)
    await connection.send(req(b"GET /download?size=%d HTTP/1.1" % size))
    await asyncio.sleep(0.5)  # the proxy's send buffer fills: it stops writing meanwhile
    answer = await connection.answer()
    connection.close()
    assert answer.status == 200
    assert answer.body == b"\xab" * size
    assert app[METRICS]["fast_path_requests_total"] == 1


@pytest.mark.parametrize("path", [b"/trickle", b"/trickl%65"])  # the fast path's, aiohttp's
async def test_a_client_that_leaves_mid_stream_stops_it(
    echo_proxy: tuple[web.Application, web.Application, str],
    caplog: pytest.LogCaptureFixture,
    path: bytes,
) -> None:
    """The proxy reads no further from ArangoDB, and logs no error: a client may leave."""
    upstream, _, base = echo_proxy
    connection = await Connection.open(base)
    await connection.send(req(b"GET " + path + b" HTTP/1.1"))
    await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
    connection.close()
    await asyncio.sleep(TRICKLE_PARTS * 0.01 + 0.5)
    assert 0 < upstream[TRICKLED][0] < TRICKLE_PARTS  # the proxy read no further
    assert (await exchange(base, req(b"GET /chunked HTTP/1.1"))).status == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [f"{r.name}: {r.getMessage()}" for r in loud] == []


def count_served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The targets of the requests the fast path serves in a task (`FastPath._serve`)
    rather than at once."""
    served: list[str] = []
    serve = FastPath._serve

    async def counting(self: FastPath, submission: Submission) -> None:
        served.append(submission.target)
        await serve(self, submission)

    monkeypatch.setattr(FastPath, "_serve", counting)
    return served


def polls(sleeping: str, quick: str) -> list[bytes]:
    """Status and result of a job still running and of one done, in that order."""
    return [
        req(b"GET /_api/job/%s HTTP/1.1" % sleeping.encode(), AUTH),
        req(b"PUT /_api/job/%s HTTP/1.1" % sleeping.encode(), AUTH),
        req(b"GET /_api/job/%s HTTP/1.1" % quick.encode(), AUTH),
        req(b"PUT /_db/_system/_api/job/%s HTTP/1.1" % quick.encode(), AUTH),
        req(b"PUT /_api/job/%s HTTP/1.1" % quick.encode(), AUTH),  # fetched: gone
        req(b"GET /_api/job/%s HTTP/1.1" % sleeping.encode(), WRONG),  # not verified
    ]


async def done_job(connection: Connection, app: web.Application) -> str:
    """A job sent on `connection`, once it is done."""
    await connection.send(req(VERSION, AUTH, STORE_MODE))
    job_id = (await connection.answer()).header("x-arango-async-id")
    assert job_id is not None
    for _ in range(500):
        if await app[STORE].state(int(job_id), None) is JobState.DONE:
            return job_id
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish")


async def test_polls_for_a_job_in_memory_are_answered_at_once_and_alike(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status and result of a job the store holds in memory, for known credentials,
    need no task: pipelined polls come back in order, as aiohttp answers them. Unknown
    credentials take the task (and get the same answer)."""
    app, base = proxy
    served = count_served(monkeypatch)
    connection = await Connection.open(base)
    await connection.send(req(b"POST /_api/cursor HTTP/1.1", AUTH, STORE_MODE, body=SLEEPY))
    sleeping = (await connection.answer()).header("x-arango-async-id")
    assert sleeping is not None
    quick = await done_job(connection, app)
    assert served == ["/_api/cursor"]  # a submission with credentials not yet known
    asked = polls(sleeping, quick)
    await connection.send(b"".join(asked))
    fast = [await connection.answer() for _ in asked]
    connection.close()
    assert [a.status for a in fast] == [204, 204, 200, 200, 404, 401]
    assert fast[3].header("x-arango-async-id") == quick
    assert served == ["/_api/cursor", "/_api/job/" + sleeping]
    # the same questions about jobs in the same states, through aiohttp
    connection = await Connection.open(base)
    await connection.send(HEALTH)
    await connection.answer()
    through_aiohttp = []
    for poll in polls(sleeping, await done_job(connection, app)):
        await connection.send(poll)
        through_aiohttp.append(await connection.answer())
    connection.close()
    assert [a.comparable() for a in through_aiohttp] == [a.comparable() for a in fast]


async def test_a_poll_for_a_job_memory_does_not_hold_reads_the_store(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, base = proxy
    served = count_served(monkeypatch)
    connection = await Connection.open(base)
    job_id = await done_job(connection, app)
    app[STORE]._fresh.remove(int(job_id))  # as for a result stored before a restart
    await connection.send(req(b"PUT /_api/job/" + job_id.encode() + b" HTTP/1.1", AUTH))
    answer = await connection.answer()
    connection.close()
    assert answer.status == 200
    assert answer.header("x-arango-async-id") == job_id
    assert served == ["/_api/version", "/_api/job/" + job_id]


async def test_a_poll_answered_at_once_reports_a_failing_store_and_a_bug(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store error is ArangoDB's 503, as on the task's path; anything else is a
    bug: a 500, and the connection closes."""
    app, base = proxy
    store = app[STORE]
    connection = await Connection.open(base)
    await connection.send(req(b"POST /_api/cursor HTTP/1.1", AUTH, STORE_MODE, body=SLEEPY))
    job_id = (await connection.answer()).header("x-arango-async-id")
    assert job_id is not None
    poll = req(b"GET /_api/job/" + job_id.encode() + b" HTTP/1.1", AUTH)

    def failing(*_args: object) -> None:
        raise StoreError("disk gone")

    monkeypatch.setattr(store, "state_now", failing)
    await connection.send(poll)
    answer = await connection.answer()
    assert answer.status == 503
    assert json.loads(answer.body) == {
        "error": True,
        "code": 503,
        "errorNum": 503,
        "errorMessage": "the proxy's job store failed: disk gone",
    }

    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(store, "state_now", broken)
    await connection.send(poll)
    answer = await connection.answer()
    assert answer.status == 500
    assert answer.header("connection") == "close"
    assert await connection.closed()
    connection.close()


async def test_a_bug_after_the_commit_closes_the_connection_after_its_202(
    proxy: tuple[web.Application, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is stored; if its 202 left from the writer's thread, no 500 follows it
    (one answer per request); otherwise the 500 is the answer. Either way the
    connection closes."""
    app, base = proxy

    served = count_served(monkeypatch)

    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    # (what the answer to a committed job calls first, in a task and at once)
    monkeypatch.setattr("proxy.intake.stored", broken)
    monkeypatch.setattr("proxy.fastpath.stored", broken)
    cases = [
        (req(VERSION, AUTH, STORE_MODE), 202),  # the 202 left from the writer's thread
        (req(b"HEAD /_api/version HTTP/1.1", AUTH, STORE_MODE), 500),  # the loop sends it
    ]
    for raw, status in [*cases, *cases]:  # credentials not known yet, then known
        connection = await Connection.open(base)
        await connection.send(raw)
        assert (await connection.answer(head=raw.startswith(b"HEAD"))).status == status
        assert await connection.closed()
        connection.close()
    assert served == ["/_api/version"] * 3  # not the second 202: at once
    store = app[STORE]
    # pending first: a job that finishes between the two reads is in one of them
    pending = await store.list_ids(done=False, viewer=None, limit=10)
    done = await store.list_ids(done=True, viewer=None, limit=10)
    assert len(set(pending) | set(done)) == 4  # all stored


async def test_polls_after_connection_close_are_not_answered(
    proxy: tuple[web.Application, str],
) -> None:
    """A poll answered at once with Connection: close ends the connection: the
    requests pipelined behind it are not served."""
    app, base = proxy
    connection = await Connection.open(base)
    await connection.send(req(b"POST /_api/cursor HTTP/1.1", AUTH, STORE_MODE, body=SLEEPY))
    job_id = (await connection.answer()).header("x-arango-async-id")
    assert job_id is not None
    poll = req(b"GET /_api/job/%s HTTP/1.1" % job_id.encode(), AUTH)
    closing = req(b"GET /_api/job/%s HTTP/1.1" % job_id.encode(), AUTH, b"Connection: close\r\n")
    await connection.send(poll + closing + poll)
    assert [(await connection.answer()).status for _ in range(2)] == [204, 204]
    assert await connection.closed()
    connection.close()
    assert app[METRICS]["fast_path_requests_total"] == 3  # the last poll was not taken


async def test_a_client_that_leaves_its_answers_unread_is_no_longer_served(
    standin: StandIn, tmp_path: Path
) -> None:
    """Requests pipelined one by one by a client that reads none of its answers: the
    unsent answers stay near the transport's high-water mark (64 KiB), as aiohttp's
    own path drains, instead of piling up for as long as the client sends; once it
    reads, every answer comes, in order."""
    app = create_app(proxy_config(standin.url, tmp_path / "data"))
    listener = Listener(app, None)
    await listener.start()
    host, port = listener.addresses[0]
    try:
        connection = await Connection.open(f"http://{host}:{port}")
        body = SLEEPY
        await connection.send(req(b"POST /_api/cursor HTTP/1.1", AUTH, STORE_MODE, body=body))
        job_id = (await connection.answer()).header("x-arango-async-id")
        assert job_id is not None
        connection.close()
        stream, fast = await small_window(listener)
        assert fast.transport is not None
        poll = req(b"GET /_api/job/%s HTTP/1.1" % job_id.encode(), AUTH)
        count = 4000
        unsent = 0
        for _ in range(count):
            stream.writer.write(poll)  # each request whole: the fast path keeps the connection
            await asyncio.sleep(0)
            unsent = max(unsent, fast.transport.get_write_buffer_size())
        assert unsent < 80 * 1024
        assert [(await stream.answer()).status for _ in range(count)] == [204] * count
        stream.close()
    finally:
        await listener.stop()


async def small_window(listener: Listener) -> tuple[Connection, FastPath]:
    """A connection to `listener` with small socket buffers on both ends, and the fast
    path serving it: the kernel holds ~12 KB of answers, not megabytes (loopback's
    autotuning), so what piles up in the proxy is seen."""
    host, port = listener.addresses[0]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    await asyncio.sleep(0.05)  # accepted
    assert listener._front is not None
    [fast] = [
        c
        for c in listener._front.connections
        if c.transport is not None
        and c.transport.get_extra_info("peername")[1] == sock.getsockname()[1]
    ]
    assert fast.transport is not None
    fast.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return Connection(reader, writer), fast


async def test_requests_waiting_for_their_turn_are_bounded_while_the_client_reads(
    standin: StandIn, tmp_path: Path
) -> None:
    """A client that pipelines 3 MB of requests that each take a task (job lists) and
    reads its answers: the proxy reads on only while less than _PAUSE_AT (256 KiB)
    waits, so it never holds much more than that plus one read."""
    app = create_app(proxy_config(standin.url, tmp_path / "data"))
    listener = Listener(app, None)
    await listener.start()
    try:
        stream, fast = await small_window(listener)
        listing = req(b"GET /_api/job/pending HTTP/1.1", AUTH, b"X-Pad: " + b"p" * 1000 + b"\r\n")
        count = 3000
        stream.writer.write(listing * count)
        waiting = 0
        for _ in range(count):
            assert (await stream.answer()).status == 200
            waiting = max(waiting, len(fast._buffer))
        assert waiting < 600 * 1024
        stream.close()
    finally:
        await listener.stop()


async def test_requests_that_wait_for_the_client_to_read_are_not_cut_by_idle_timeout(
    standin: StandIn, tmp_path: Path
) -> None:
    """The client reads nothing for longer than server.idle_timeout while its
    pipelined requests wait (writing paused): the connection is not idle, and every
    request is answered once it reads."""
    config = proxy_config(standin.url, tmp_path / "data", server={"idle_timeout": 0.3})
    listener = Listener(create_app(config), None)
    await listener.start()
    try:
        stream, _ = await small_window(listener)
        poll = req(b"GET /_api/job/123456 HTTP/1.1", AUTH)
        count = 3000
        stream.writer.write(poll * count)
        await asyncio.sleep(1.0)
        assert [(await stream.answer()).status for _ in range(count)] == [404] * count
        stream.close()
    finally:
        await listener.stop()


async def test_a_long_request_does_not_wake_the_idle_check_again_and_again(
    standin: StandIn, serve_proxy: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request under way past server.idle_timeout: the idle check looks again after
    the answer, not every millisecond meanwhile."""
    config = proxy_config(standin.url, tmp_path / "data", server={"idle_timeout": 0.1})
    base = await serve_proxy(create_app(config))
    checks = 0
    check_idle = FastPath._check_idle

    def counted(self: FastPath) -> None:
        nonlocal checks
        checks += 1
        check_idle(self)

    monkeypatch.setattr(FastPath, "_check_idle", counted)
    connection = await Connection.open(base)
    query = json.dumps({"query": "RETURN SLEEP(0.6)"}).encode()
    await connection.send(req(b"POST /_api/cursor HTTP/1.1", AUTH, body=query))
    assert (await connection.answer()).status == 201
    assert await connection.closed()  # idle after the answer: closed 0.1 s later
    connection.close()
    assert checks <= 3


async def test_header_bytes_that_are_not_utf8_pass_back_as_they_came(
    raw_server: StartServer,  # noqa: F811 (the fixture imported above)
    serve_proxy: Serve,
    tmp_path: Path,
) -> None:
    """obs-text in a field value (RFC 9110 5.5) from ArangoDB: passed back byte for
    byte (it made the fast path's encoding fail with a 500)."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Name: caf\xe9\r\n\r\nok"
    server = await raw_server(answer(reply))
    base = await serve_proxy(create_app(proxy_config(f"http://127.0.0.1:{server.port}", tmp_path)))
    connection = await Connection.open(base)
    await connection.send(req(b"GET /_api/version HTTP/1.1", AUTH))
    head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
    connection.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nX-Name: caf\xe9\r\n" in head

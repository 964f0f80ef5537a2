"""Hostile input against the proxy: malformed HTTP, smuggling, odd paths and job ids.

Malformed HTTP never reaches the proxy's handlers: aiohttp's C parser refuses
it, and the proxy answers ``400`` in ArangoDB's error shape (errorNum 400) and
closes the connection; the answer never quotes the request (aiohttp's own would
echo the line at fault, an Authorization header say). Each test then shows that
the proxy is still up and that nothing was stored or sent to ArangoDB. Odd
paths and job ids that do parse are answered exactly as the stand-in (which
follows ArangoDB) answers them directly.
Headers over server.max_header_size get 431 in ArangoDB's shape from the
proxy itself. Request bodies over the size limit (413) and slow bodies (408) are tested in
test_errors.py, headers that stop arriving in test_passthrough.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import ProxyFactory
from tests.standin import StandIn
from tests.standin.client import ALICE, Client, RawClient
from tests.standin.pytest_plugin import StandInFactory
from tests.test_isolation import SECRET, SUPERUSER
from tests.test_jobs_conformance import SLEEP, Recorder

AUTH = b"Authorization: Basic " + base64.b64encode(b"alice:alicepw") + b"\r\n"
STORE = b"x-arango-async: store\r\n"
SMUGGLED = b"PUT /_api/version HTTP/1.1\r\nHost: x\r\n" + AUTH + STORE + b"\r\n"


@pytest.fixture
async def standin_jwt(standin_factory: StandInFactory) -> StandIn:
    return await standin_factory(auth=True, jwt_secret=SECRET, workers=8)


def request(head: bytes, body: bytes = b"") -> bytes:
    """An async store request to the proxy with `head` as its extra header lines."""
    return b"PUT /_api/version HTTP/1.1\r\nHost: proxy\r\n" + AUTH + STORE + head + b"\r\n" + body


async def exchange(base: str, data: bytes, *, seconds: float = 10.0) -> bytes:
    """Send raw bytes, read until the proxy closes the connection."""
    reader, writer = await connect(base)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=seconds)
    finally:
        writer.close()


async def connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(base)
    assert url.host is not None
    assert url.port is not None
    return await asyncio.open_connection(url.host, url.port)


def answers(reply: bytes) -> list[tuple[int, bytes, bytes]]:
    """(status, head, body) of each answer in `reply`, in order."""
    found = []
    while reply:
        head, _, rest = reply.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        found.append((int(head.split(b" ", 2)[1]), head, rest[:length]))
        reply = rest[length:]
    return found


def only_answer(reply: bytes) -> tuple[int, bytes, bytes]:
    """The one answer in `reply`: a second one means part of the request was read as another."""
    [answer] = answers(reply)
    return answer


async def stored_ids(http: aiohttp.ClientSession, proxy: str) -> list[str]:
    """Every job in the proxy's store that has an id, as the superuser sees them."""
    client = Client(http, proxy)
    found: list[str] = []
    for kind in ("pending", "done"):  # a job only moves on: none slips between
        answer = await client.call("GET", f"/_api/job/{kind}?count=100000", user=SUPERUSER)
        assert answer.status == 200, answer
        found += answer.json
    return sorted(set(found))


async def assert_still_serving(http: aiohttp.ClientSession, proxy: str) -> None:
    client = Client(http, proxy)
    job = await client.submit("PUT", "/_api/version", user=ALICE)
    assert (await client.result(job, user=ALICE)).status == 200


async def assert_refused(
    http: aiohttp.ClientSession, standin: StandIn, proxy: str, raw: bytes, code: int, message: str
) -> None:
    """`raw` gets one error in ArangoDB's shape; nothing is stored or sent on (only the
    credential checks, GETs, reach the stand-in); the proxy serves on."""
    status, head, body = only_answer(await exchange(proxy, raw))
    assert status == code
    assert b"Content-Type: application/json; charset=utf-8" in head
    expected = {"code": code, "error": True, "errorMessage": message, "errorNum": code}
    assert json.loads(body) == expected
    assert await stored_ids(http, proxy) == []
    assert not [call for call in standin.executed if call[0] != "GET"]
    await assert_still_serving(http, proxy)


MALFORMED = {
    "Content-Length and Transfer-Encoding": request(
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "Transfer-Encoding and Content-Length": request(
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "duplicated Content-Length": request(
        b"Content-Length: 2\r\nContent-Length: 2\r\n", b"{}" + SMUGGLED
    ),
    "conflicting Content-Length": request(
        b"Content-Length: 2\r\nContent-Length: 60\r\n", b"{}" + SMUGGLED
    ),
    "Content-Length list": request(b"Content-Length: 2, 2\r\n", b"{}" + SMUGGLED),
    "signed Content-Length": request(b"Content-Length: +2\r\n", b"{}" + SMUGGLED),
    "space before colon": request(b"Content-Length : 2\r\n", b"{}" + SMUGGLED),
    "Transfer-Encoding chunked, identity": request(
        b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "Transfer-Encoding xchunked": request(b"Transfer-Encoding: xchunked\r\n", SMUGGLED),
    "Transfer-Encoding twice": request(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "folded Transfer-Encoding": request(b"Transfer-Encoding:\r\n chunked\r\n", SMUGGLED),
    "chunk size overflow": request(
        b"Transfer-Encoding: chunked\r\n", b"f" * 40 + b"\r\n" + SMUGGLED
    ),
    "bare CR in a header value": request(b"X-Note: a\rx-arango-async: true\r\n"),
    "bare LF in a header value": request(b"X-Note: a\nX-Injected: 1\r\n"),
    "NUL in a header value": request(b"X-Note: a\x00b\r\n"),
    "header line beyond the parser's ceiling": request(
        b"X-Big: alicepw" + b"a" * 300_000 + b"\r\n"
    ),
    "headers beyond the parser's count": request(b"X-H: v\r\n" * 9000),
    "a header field twice that may come once": request(
        b"Content-Type: application/json\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n",
        b"{}",
    ),
    "target over 8 KiB": b"GET /_api/job/alicepw" + b"1" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-form target without a host": b"GET http://alice:alicepw@/_api/version HTTP/1.1\r\n"
    + b"Host: x\r\n\r\n",
    "CONNECT to no host": b"CONNECT alice:alicepw HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in the path": b"GET /_api/job/\x00 HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n",
    "non-UTF-8 bytes in the path": b"PUT /_api/job/\xff\xfe HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b"\r\n",
    "space in the path": b"GET /_api/job/1 2 HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED))
async def test_malformed_http_is_refused_and_changes_nothing(
    raw: str,
    standin_jwt: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused, 400 (431 for what is over the parser's limits on header fields, as it
    reads them), with neither the answer nor the log quoting the request."""
    proxy = await start_proxy(standin_jwt.url)
    status, _, body = only_answer(await exchange(proxy, MALFORMED[raw]))
    refusal = json.loads(body)
    if "beyond the parser" in raw:
        assert (status, refusal["code"], refusal["errorNum"]) == (431, 431, 431)
        assert refusal["errorMessage"] in (
            "request header fields are larger than the limit of 65536 bytes",
            "more than 256 header fields",
        )
    else:
        assert (status, refusal["code"], refusal["errorNum"]) == (400, 400, 400)
        assert refusal["errorMessage"].startswith("malformed request: ")
    assert refusal["error"] is True
    assert b"alicepw" not in body
    assert base64.b64encode(b"alice:alicepw") not in body
    assert "alicepw" not in caplog.text
    assert await stored_ids(http, proxy) == []
    assert not [call for call in standin_jwt.executed if call[0] != "GET"]
    await assert_still_serving(http, proxy)


@pytest.mark.parametrize(
    "head",
    [
        b"PUT /_api/version HTTP/1.1\r\n" + STORE,  # an async submission
        b"GET /_api/job/pending HTTP/1.1\r\n",  # the job API
        b"GET /_api/version HTTP/1.1\r\n",  # pass-through
    ],
    ids=["async", "job-api", "pass-through"],
)
async def test_credentials_that_are_not_utf8_get_401(
    head: bytes, standin_jwt: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """As ArangoDB answers them; the proxy's digest of them used to fail (a 500)."""
    proxy = await start_proxy(standin_jwt.url)
    raw = head + b"Host: x\r\nAuthorization: Basic \xff\xfe\r\nConnection: close\r\n\r\n"
    status, _, body = only_answer(await exchange(proxy, raw))
    assert status == 401
    assert json.loads(body)["errorNum"] == 11
    assert await stored_ids(http, proxy) == []
    await assert_still_serving(http, proxy)


OVERSIZE_HEADERS = {
    "one header of 70 KiB": b"X-Big: " + b"a" * 70_000 + b"\r\n",
    "many headers, 70 KiB in all": b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)),
}


@pytest.mark.parametrize("head", list(OVERSIZE_HEADERS))
@pytest.mark.parametrize("mode", [b"", STORE], ids=["sync", "store"])
async def test_oversize_headers_get_431_in_arangodb_shape(
    head: str,
    mode: bytes,
    standin_jwt: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Over server.max_header_size (64 KiB): refused before anything is stored or sent."""
    proxy = await start_proxy(standin_jwt.url)
    raw = b"PUT /_api/version HTTP/1.1\r\nHost: proxy\r\n" + AUTH + mode
    raw += OVERSIZE_HEADERS[head] + b"Connection: close\r\n\r\n"
    message = "request header fields are larger than the limit of 65536 bytes"
    await assert_refused(http, standin_jwt, proxy, raw, 431, message)


@pytest.mark.parametrize(
    "fields", [b"X-Big: " + b"a" * 70_000, b"X-H: v\r\n" * 300], ids=["one field", "many"]
)
async def test_a_head_over_the_parsers_limits_is_refused_as_it_arrives(
    fields: bytes, standin_jwt: StandIn, start_proxy: ProxyFactory
) -> None:
    """A field larger than server.max_header_size, or more than 256 fields, is refused
    while the head is still coming: what a connection's parser holds is bounded (one
    of 256 KiB, or 8,192 fields, was held until the head ended: gigabytes a
    connection)."""
    proxy = await start_proxy(standin_jwt.url)
    reader, writer = await connect(proxy)
    try:
        writer.write(b"GET /_api/version HTTP/1.1\r\nHost: x\r\n" + fields)  # (no end)
        reply = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status, _, body = only_answer(reply)
    assert (status, json.loads(body)["errorNum"]) == (431, 431)


@pytest.mark.parametrize(
    "target", ["http://127.0.0.1:9/_api/version", "http://x/_api/job/pending", "*"]
)
@pytest.mark.parametrize("mode", [b"", STORE], ids=["sync", "store"])
async def test_a_target_that_is_no_path_is_refused(
    target: str,
    mode: bytes,
    standin_jwt: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Absolute- and asterisk-form targets: ArangoDB serves neither. (Authority-form
    comes with CONNECT, a method it does not serve: see below.)"""
    proxy = await start_proxy(standin_jwt.url)
    method = b"OPTIONS" if target == "*" else b"PUT"
    raw = method + b" " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + mode
    raw += b"Connection: close\r\n\r\n"
    await assert_refused(http, standin_jwt, proxy, raw, 400, "the request target must be a path")


async def test_body_over_limit_does_not_smuggle_its_content(
    standin_jwt: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A 413 answered before the body is read: the body's bytes are still only body."""
    proxy = await start_proxy(standin_jwt.url, server={"max_body_size": 100})
    body = SMUGGLED * 3
    then = b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = await exchange(proxy, request(b"Content-Length: %d\r\n" % len(body), body) + then)
    # exactly two answers: the 413, then the request that really followed the body
    assert [status for status, _, _ in answers(reply)] == [413, 200]
    assert await stored_ids(http, proxy) == []
    await assert_still_serving(http, proxy)


async def test_a_steady_trickle_of_header_bytes_is_cut(
    standin_jwt: StandIn, start_proxy: ProxyFactory
) -> None:
    """Slowloris sends a byte now and then; idle_timeout bounds the whole head, not a gap."""
    proxy = await start_proxy(standin_jwt.url, server={"idle_timeout": 0.5})
    reader, writer = await connect(proxy)
    writer.write(b"GET /_api/version HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        for _ in range(400):  # 20 s of trickling, far beyond the timeout
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof() or writer.is_closing():
                break
            with_data = asyncio.ensure_future(reader.read(1))
            done, _ = await asyncio.wait([with_data], timeout=0)
            if not done:
                with_data.cancel()
                continue
            assert with_data.result() == b""  # closed without an answer
            break
        else:
            pytest.fail("the proxy kept reading a header that never ends")
    except ConnectionError:
        pass  # cut while we were writing: just as good
    finally:
        writer.close()


async def test_a_steady_trickle_of_body_bytes_gets_408(
    standin_jwt: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """body_timeout bounds the whole async body, also when bytes keep coming."""
    proxy = await start_proxy(standin_jwt.url, server={"body_timeout": 0.3})
    reader, writer = await connect(proxy)
    writer.write(request(b"Content-Length: 400\r\n"))
    answer = asyncio.ensure_future(reader.read())
    try:
        for _ in range(400):
            if answer.done():
                break
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)
    except ConnectionError:
        pass
    reply = await asyncio.wait_for(answer, timeout=10)
    writer.close()
    status, head, body = only_answer(reply)
    assert status == 408
    assert b"application/json" in head
    assert body.startswith(b'{"code":408,"error":true,')
    assert await stored_ids(http, proxy) == []


async def odd_ids(r: Recorder) -> None:
    """Job ids as ArangoDB parses them: std::from_chars on the raw suffix (spec §2-§5)."""
    for name in ("a", "b", "c", "d", "e"):
        await r.submit(name, "PUT", "/_api/version")
        await r.wait(name)
    await r.submit("p", "POST", "/_api/cursor", body=SLEEP)
    for method in ("GET", "PUT", "DELETE"):
        for odd in (
            "+{a}",  # no sign allowed: id 0
            "-{a}",
            "0x{a}",  # from_chars reads "0"
            "%20{a}",
            "%2B{a}",
            "%D9%A3",  # an Arabic-Indic three is no digit
            "18446744073709551616",  # 2**64: overflow, id 0
            "99999999999999999999999999999999",
            "1" * 5000,
            "%00",
            "%FF%FE",
            "%61ll",  # raw suffixes: %61ll is not "all"
            "%64one",
            "",
        ):
            await r.call(method, "/_api/job/" + odd)
            await r.call("PUT", "/_api/job/" + odd + "/cancel")
    await r.call("GET", "/_api/job/0{a}")  # GET reads ids only from a leading 1-9
    await r.call("GET", "/_api/job/{a}junk")
    await r.call("GET", "/_api/job/{p}%00")
    await r.call("GET", "/_api/job/{p}%FF")
    await r.call("PUT", "/_api/job/{p}%0D%0AX-Injected:%201")  # pending: 204
    # ids with a tail or padding address the job: the answer carries the id as sent
    await r.call("PUT", "/_api/job/00{a}")
    await r.call("PUT", "/_api/job/{b}junk")
    await r.call("PUT", "/_api/job/" + "0" * 5000 + "{c}")
    await r.call("PUT", "/_api/job/{d}%0D%0AX-Injected:%201")
    await r.call("PUT", "/_api/job/00{e}/cancel")
    await r.call("DELETE", "/_api/job/0{e}")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")


async def odd_paths(r: Recorder) -> None:
    """Repeated slashes are collapsed (ArangoDB's parseUrl), nothing else is normalised."""
    for name in ("a", "b", "c"):
        await r.submit(name, "PUT", "/_api/version")
        await r.wait(name)
    await r.submit("p", "POST", "/_api/cursor", body=SLEEP)
    for method, path in [
        ("GET", "//_api//job//{p}"),
        ("GET", "/_db/_system//_api/job/done"),
        ("GET", "//_db//_system//_admin//job//{a}"),
        ("GET", "/_api/job/../job/{a}"),
        ("GET", "/_api/job/{a}/.."),
        ("GET", "/_api/job/./{a}"),
        ("GET", "/_api/job%2F{a}"),
        ("GET", "/_api/job/done%2F"),
        ("DELETE", "/_api/job%2Fall"),
        ("GET", "/_api/job/%2E%2E/{a}"),
        ("GET", "/_db/%5Fsystem/_api/job/{a}"),
        ("GET", "/_api/job/{a}%0A"),  # a decoded newline must not fall out of the routes
        ("GET", "/_api/version/%0A"),
        ("GET", "/_db/_sys%00tem/_api/job/{a}"),
        ("GET", "/_db/..%2F_system/_api/job/{a}"),
        ("PUT", "//_api/job/{a}"),
        ("DELETE", "/_db/_system//_api/job//{b}"),
        ("GET", "/_api/job/done"),
        ("GET", "/_api/job/pending"),
        ("PUT", "/_admin/job//{p}//cancel"),
    ]:
        await r.call(method, path)
    await r.wait("p")  # cancelled: done soon, with 410 as its result
    # CORS preflight: answered by ArangoDB before credentials, never queued (spec §1.3)
    await r.call("OPTIONS", "/_api/job/{a}", user={})
    await r.call("OPTIONS", "/_api/version", headers={"x-arango-async": "store"})
    await r.call("OPTIONS", "//_api//job", headers={"x-arango-async": "store"})
    await r.call("GET", "/_api/job/pending")
    # an async request for the job API spelled with slashes runs in the facade too
    await r.submit("x", "PUT", "//_api//job/{c}")
    await r.wait("x")
    await r.call("PUT", "/_api/job/{x}")
    await r.call("GET", "/_api/job/{c}")
    await r.call("DELETE", "//_api//job//all")
    await r.call("GET", "/_api/job/pending")
    await r.call("GET", "/_api/job/done")


async def odd_parameters(r: Recorder) -> None:
    """count and stamp as ArangoDB parses them: a number or nothing, never a prefix."""
    for name in ("a", "b"):
        await r.submit(name, "PUT", "/_api/version")
        await r.wait(name)
    for count in ("1x", "+5", "%D9%A3", "1" * 5000, "0x10", "-1", "%00"):
        await r.call("GET", f"/_api/job/done?count={count}", count_only=True)
    for stamp in ("99999999999x", "%D9%A3%D9%A3", "%2099999999999", "9e9e9", "1.2.3", "+-1"):
        await r.call("DELETE", f"/_api/job/expired?stamp={stamp}")
        await r.call("GET", "/_api/job/done")
    # repeated parameters: the last one counts (setValue overwrites)
    await r.call("GET", "/_api/job/done?count=5&count=1", count_only=True)
    await r.call("DELETE", "/_api/job/expired?stamp=9e10&stamp=0")
    await r.call("GET", "/_api/job/done")
    await r.call("DELETE", "/_api/job/expired?stamp=0&stamp=%2B9.9e10")
    await r.call("GET", "/_api/job/done")


SCENARIOS = {f.__name__: f for f in (odd_ids, odd_paths, odd_parameters)}


class IdRecorder(Recorder):
    """Also names job ids inside paths that answers quote (``unknown path '/_api/job/7'``)."""

    def _normal(self, value: Any) -> Any:
        value = super()._normal(value)
        if isinstance(value, str):
            for name, job_id in self.ids.items():
                value = re.sub(rf"(?<=/){job_id}(?![0-9])", f"<{name}>", value)
        return value


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_odd_ids_and_paths_answer_like_arangodb(
    name: str, standin_jwt: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    scenario = SCENARIOS[name]
    direct = IdRecorder(RawClient(http, standin_jwt.url))
    await scenario(direct)
    proxy = await start_proxy(standin_jwt.url)
    proxied = IdRecorder(RawClient(http, proxy))
    await scenario(proxied)
    for (label, got), (_, expected) in zip(proxied.log, direct.log, strict=True):
        assert got == expected, label
    for label, (status, *_) in proxied.log:
        assert status < 500, label


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND", "LINK", "CONNECT"])
@pytest.mark.parametrize("path", ["/_api/version", "/_api/job/pending"])
async def test_a_method_arangodb_does_not_serve_gets_its_bare_405_and_no_job(
    method: str,
    path: str,
    standin_jwt: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """ArangoDB knows seven methods; its parser stops at any other: 405 without a body,
    and the connection closed (the bytes after it are never read as a request)."""
    proxy = await start_proxy(standin_jwt.url)
    raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + AUTH + STORE + b"\r\n"
    status, head, body = only_answer(await exchange(proxy, raw + SMUGGLED))
    assert (status, body) == (405, b"")
    assert b"\r\nServer: ArangoDB" in head
    assert await stored_ids(http, proxy) == []
    assert not [call for call in standin_jwt.executed if call[0] != "GET"]  # (GET: checks)

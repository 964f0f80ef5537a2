"""Pass-through fidelity against a real echo server, and the upstream failure mapping."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamFailure
from proxy.upstream import Upstream
from tests.conftest import ProxyFactory
from tests.processes import ProxyProcess, free_port
from tests.standin import StandIn
from tests.standin.client import ROOT, Answer, Client
from tests.test_http1 import StartServer, raw_server  # noqa: F401 (a fixture)

ALL_BYTES = bytes(range(256)) * 64


async def _echo(request: web.Request) -> web.Response:
    """Describe the request exactly as it arrived."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_len": len(body),
        }
    )


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code, headers={"X-Kind": "empty"})
    return web.Response(
        status=code, reason="Custom Reason", body=ALL_BYTES, content_type="application/x-raw"
    )


async def _cookies(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    response.headers["Connection"] = "keep-alive, X-Secret-Hop"
    response.headers["X-Secret-Hop"] = "must not pass"
    response.headers["Keep-Alive"] = "timeout=5"
    return response


async def _gzip(request: web.Request) -> web.Response:
    return web.Response(
        body=gzip.compress(b'{"zipped":true}', mtime=0),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(text="late")


async def _download(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"\xab" * (1024 * 1024)
    sent = 0
    while sent < size:
        chunk = block[: size - sent]
        await response.write(chunk)
        sent += len(chunk)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def _broken(request: web.Request) -> web.StreamResponse:
    """Promises 1 MB, sends 10 bytes, hangs up."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 1024 * 1024
    await response.prepare(request)
    await response.write(b"0123456789")
    assert request.transport is not None
    request.transport.close()
    return response


async def _chunked(request: web.Request) -> web.StreamResponse:
    """No length: the body comes chunked, in three writes."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for part in (b"one ", b"two ", b"three"):
        await response.write(part)
    await response.write_eof()
    return response


TRICKLE_PARTS = 200


async def _trickle(request: web.Request) -> web.StreamResponse:
    """TRICKLE_PARTS small writes 10 ms apart; counts the parts written in
    app[TRICKLED] (a client that leaves should stop it early)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.content_length = TRICKLE_PARTS
    await response.prepare(request)
    written = request.app[TRICKLED]
    for _ in range(TRICKLE_PARTS):
        try:
            await response.write(b"x")
        except ConnectionError:
            return response  # the proxy hung up: stop (quietly, for tests that look at logs)
        written[0] += 1
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


TRICKLED = web.AppKey("trickled", list[int])


def echo_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app[TRICKLED] = [0]
    app.router.add_routes(
        [
            web.route("*", "/status/{code}", _status),
            web.get("/cookies", _cookies),
            web.get("/gzip", _gzip),
            web.get("/redirect", _redirect),
            web.get("/slow", _slow),
            web.get("/broken", _broken),
            web.get("/download", _download),
            web.get("/chunked", _chunked),
            web.get("/trickle", _trickle),
            web.post("/upload", _upload),
            web.route("*", "/{tail:.*}", _echo),
        ]
    )
    return app


@pytest.fixture
async def echo(serve_app: Callable[[web.Application], Awaitable[str]]) -> str:
    return await serve_app(echo_app())


@pytest.fixture
async def proxy(start_proxy: ProxyFactory, echo: str) -> str:
    return await start_proxy(echo)


async def _echoed(http: aiohttp.ClientSession, method: str, url: str | URL, **kw: Any) -> Any:
    async with http.request(method, url, **kw) as resp:
        assert resp.status == 200
        return json.loads(await resp.read())


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_methods_and_bodies_arrive_unchanged(
    http: aiohttp.ClientSession, proxy: str, method: str
) -> None:
    seen = await _echoed(http, method, proxy + "/_db/x/_api/thing", data=ALL_BYTES)
    assert seen["method"] == method
    assert seen["raw_path"] == "/_db/x/_api/thing"
    assert seen["body_sha256"] == hashlib.sha256(ALL_BYTES).hexdigest()
    assert seen["body_len"] == len(ALL_BYTES)


async def test_head_gets_headers_without_body(http: aiohttp.ClientSession, proxy: str) -> None:
    async with http.head(proxy + "/status/200") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(ALL_BYTES))
        assert await resp.read() == b""


async def test_raw_path_and_query_are_not_reencoded(
    http: aiohttp.ClientSession, proxy: str
) -> None:
    target = "/_api/document/c/a%2Fb%20c?x=%20y&x=2&q=%C3%A9&flag&empty="
    seen = await _echoed(http, "GET", URL(proxy + target, encoded=True))
    assert seen["raw_path"] == target


async def test_headers_hop_by_hop_dropped_forwarded_added(
    http: aiohttp.ClientSession, proxy: str
) -> None:
    seen = await _echoed(
        http,
        "GET",
        proxy + "/h",
        headers={
            "Authorization": "Basic cm9vdDo=",
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "named in Connection",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "secret",
            "X-Forwarded-For": "10.0.0.1",
        },
    )
    names = {k.lower(): v for k, v in seen["headers"]}
    assert names["authorization"] == "Basic cm9vdDo="
    assert names["x-custom"] == "kept"
    for dropped in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in names
    assert names["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == proxy.removeprefix("http://")
    # the proxy adds nothing a client did not send (aiohttp would add these itself)
    assert "user-agent" not in names or names["user-agent"].startswith("Python/")
    assert names["host"] != names["x-forwarded-host"]


@pytest.mark.parametrize("path", ["/h", "/h%41"])  # the fast path's, aiohttp's
async def test_a_field_repeated_in_another_case_arrives_whole(proxy: str, path: str) -> None:
    """X-Dup: 1 and x-dup: 2 are one field with two values (RFC 9110 5.1): both
    arrive, under the first spelling (aiohttp's client alone would keep the last)."""
    url = URL(proxy)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: p\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    seen = json.loads(await reader.readexactly(length))
    writer.close()
    assert [pair for pair in seen["headers"] if pair[0].lower() == "x-dup"] == [
        ["X-Dup", "1"],
        ["X-Dup", "2"],
    ]


async def test_an_expectation_is_met_by_the_proxy_not_passed_on(
    http: aiohttp.ClientSession, proxy: str
) -> None:
    """Expect: 100-continue is answered by the proxy, which then sends ArangoDB the
    whole body: passed on, the proxy's client would wait for ArangoDB's 100, and one
    that sends none (RFC 9110 10.1.1 allows it) held the request for ever."""
    seen = await _echoed(http, "POST", proxy + "/expect", data=b"hello", expect100=True)
    assert seen["body_len"] == 5
    assert "expect" not in {name.lower() for name, _ in seen["headers"]}


@pytest.mark.parametrize("code", [201, 202, 204, 304, 400, 404, 409, 410, 500, 503])
async def test_status_reason_and_body_pass_back(
    http: aiohttp.ClientSession, proxy: str, echo: str, code: int
) -> None:
    async with http.get(echo + f"/status/{code}") as direct:
        direct_body = await direct.read()
        direct_headers = {k: v for k, v in direct.headers.items() if k not in ("Date", "Server")}
    async with http.get(proxy + f"/status/{code}") as resp:
        assert resp.status == code
        assert resp.reason == direct.reason
        assert await resp.read() == direct_body
        assert {k: v for k, v in resp.headers.items() if k not in ("Date", "Server")} == (
            direct_headers
        )


async def test_response_headers_multi_values_kept_hop_by_hop_dropped(
    http: aiohttp.ClientSession, proxy: str
) -> None:
    async with http.get(proxy + "/cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "X-Secret-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers


async def test_compressed_body_is_not_touched(http: aiohttp.ClientSession, proxy: str) -> None:
    async with http.get(proxy + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == gzip.compress(b'{"zipped":true}', mtime=0)


async def test_redirects_are_not_followed(http: aiohttp.ClientSession, proxy: str) -> None:
    async with http.get(proxy + "/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"


async def test_upstream_down_is_503_in_arango_shape(
    http: aiohttp.ClientSession, start_proxy: ProxyFactory
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await start_proxy(dead)
    async with http.get(proxy + "/_api/version") as resp:
        assert resp.status == 503
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        body = await resp.json()
    assert body["error"] is True
    assert body["code"] == 503
    assert body["errorNum"] == 503
    assert dead in body["errorMessage"]
    assert "unreachable" in body["errorMessage"]


async def test_upstream_timeout_is_504_in_arango_shape(
    http: aiohttp.ClientSession, start_proxy: ProxyFactory, echo: str
) -> None:
    proxy = await start_proxy(echo, upstream={"request_timeout": 0.3})
    async with http.get(proxy + "/slow") as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body == {
        "error": True,
        "errorNum": 504,
        "errorMessage": f"upstream ArangoDB at {echo} did not answer in time",
        "code": 504,
    }


async def test_health(http: aiohttp.ClientSession, proxy: str) -> None:
    async with http.get(proxy + "/_proxy/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def _blocks(total: int, block: bytes) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield block
        sent += len(block)


async def test_large_bodies_stream_without_growing_memory(
    http: aiohttp.ClientSession,
    serve_app: Callable[[web.Application], Awaitable[str]],
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    """200 MB up and 200 MB down through a real proxy process: its peak RSS stays far below."""
    echo = await serve_app(echo_app())
    proc = proxy_process("--upstream", echo)
    size = 200 * 1024 * 1024
    block = b"\xcd" * (1024 * 1024)
    baseline = proc.peak_rss_kib()

    async with http.post(
        proc.url + "/upload",
        data=_blocks(size, block),
        headers={"Content-Length": str(size)},
    ) as resp:
        assert resp.status == 200
        got = await resp.json()
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    assert got == {"size": size, "sha256": expected.hexdigest()}

    received = 0
    async with http.get(proc.url + f"/download?size={size}") as resp:
        assert resp.headers["Content-Length"] == str(size)
        async for chunk in resp.content.iter_chunked(1024 * 1024):
            received += len(chunk)
    assert received == size
    growth_mib = (proc.peak_rss_kib() - baseline) / 1024
    assert growth_mib < 50, f"proxy grew by {growth_mib:.0f} MiB while streaming 400 MB"
    assert proc.stop() == 0


async def test_upstream_breaking_off_mid_body_cuts_the_client_too(
    http: aiohttp.ClientSession, proxy: str
) -> None:
    async with http.get(proxy + "/broken") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_upstream_call_maps_a_broken_body(echo: str) -> None:
    upstream = Upstream(UpstreamConfig(url=echo))
    await upstream.start()
    try:
        with pytest.raises(UpstreamFailure) as info:
            await upstream.call("GET", "/broken", CIMultiDict())
    finally:
        await upstream.close()
    assert info.value.status == 503
    assert echo in info.value.message


async def test_version_passes_byte_for_byte(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin.url)

    async def fetch(base: str) -> tuple[int, bytes, list[tuple[str, str]]]:
        async with http.get(base + "/_api/version?details=true", headers=ROOT) as resp:
            headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "date"]
            return resp.status, await resp.read(), headers

    assert await fetch(proxy) == await fetch(standin.url)


async def test_idle_timeout_also_bounds_slow_headers(start_proxy: ProxyFactory, echo: str) -> None:
    """aiohttp's keep-alive timer runs until the headers are complete (slowloris)."""
    proxy = await start_proxy(echo, server={"idle_timeout": 0.5})
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    await writer.drain()
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, no answer
    assert asyncio.get_running_loop().time() - started < 5
    writer.close()


@pytest.mark.parametrize("path", [b"/x", b"/%78"])  # the fast path's, aiohttp's
async def test_an_invalid_answer_is_a_502_and_a_long_field_passes(
    raw_server: StartServer,  # noqa: F811 (the fixture imported above)
    start_proxy: ProxyFactory,
    path: bytes,
) -> None:
    """An answer that is not valid HTTP (a length and chunked both) is ArangoDB's
    fault, not its absence: 502, not 503 "unreachable". A 20 KB header field is
    valid: it passes, as it does through the proxy's own client."""
    long_field = b"X-Long: " + b"v" * 20_000
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + long_field + b"\r\n\r\nok",
        ]
    )

    async def handler(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(next(answers))

    server = await raw_server(handler)
    proxy = URL(await start_proxy(f"http://127.0.0.1:{server.port}"))
    statuses, heads = [], []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: p\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        statuses.append(int(head.split(b" ")[1]))
        heads.append(head)
    assert statuses == [502, 200]
    assert b"\r\n" + long_field + b"\r\n" in heads[1]


BODY_ROUTES: dict[str, dict[str, Any]] = {  # the fast path, and aiohttp's parser's ways
    "Content-Length": {},
    "chunked": {"chunked": True},
    "HTTP/1.0": {},
    "Expect: 100-continue": {"expect100": True},
    "over 1 MiB": {},
}


@pytest.mark.parametrize("mode", ["", "store"])
@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_a_compressed_request_body_reaches_arangodb_as_sent(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    route: str,
    mode: str,
) -> None:
    """Nothing is decoded on the way: ArangoDB gets the gzip bytes with the client's
    Content-Encoding and Content-Length, and decodes them itself."""
    proxy = await start_proxy(standin.url)
    direct = Client(http, standin.url)
    assert (await direct.call("POST", "/_api/collection", {"name": "zipped"})).status == 200
    size = 1_200_000 if route == "over 1 MiB" else 300  # (base64 keeps 3/4 through gzip)
    doc = {"_key": "k", "text": base64.b64encode(os.urandom(size)).decode()}
    body = gzip.compress(json.dumps(doc).encode())
    headers = {**ROOT, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    if mode:
        headers["x-arango-async"] = mode
    url = proxy + "/_api/document/zipped"
    version = aiohttp.HttpVersion10 if route == "HTTP/1.0" else aiohttp.HttpVersion11
    async with (
        aiohttp.ClientSession(version=version) as session,
        session.post(url, data=io.BytesIO(body), headers=headers, **BODY_ROUTES[route]) as resp,
    ):
        answer = Answer(resp.status, await resp.read(), CIMultiDictProxy(resp.headers))
    if mode:
        assert answer.status == 202, answer
        assert answer.async_id is not None
        answer = await Client(http, proxy).result(answer.async_id)
    assert answer.status == 202, answer  # ArangoDB's insert without waitForSync
    assert (await direct.call("GET", "/_api/document/zipped/k")).json["text"] == doc["text"]


@pytest.mark.parametrize("mode", ["", "store"])
@pytest.mark.parametrize(
    "body", [b"not gzip at all", gzip.compress(b'{"a":1}')[:-9]], ids=["garbage", "cut short"]
)
async def test_a_body_that_does_not_decode_gets_arangodbs_400_at_once(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession, body: bytes, mode: str
) -> None:
    """ArangoDB decodes a gzip body before it looks at x-arango-async: one that does
    not decode (garbage, cut short) is refused at once, 400/10, and never queued."""
    proxy = await start_proxy(standin.url)
    assert (
        await Client(http, standin.url).call("POST", "/_api/collection", {"name": "z"})
    ).status == 200
    headers = {"Content-Encoding": "gzip", **({"x-arango-async": mode} if mode else {})}
    answers = [
        await Client(http, url).call("POST", "/_api/document/z", body, headers=headers)
        for url in (standin.url, proxy)
    ]
    for answer in answers:
        assert (answer.status, answer.json["errorNum"], answer.json["errorMessage"]) == (
            400,
            10,
            "decoding error",
        ), answer
        assert answer.async_id is None
    assert (await Client(http, proxy).call("GET", "/_api/job/pending")).json == []
    assert standin.executed[("POST", "/_api/document/z")] == 0

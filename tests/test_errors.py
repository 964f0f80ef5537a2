"""Every error the proxy itself produces has ArangoDB's shape.

One walk over every way the proxy can refuse a request: each answer must be
``application/json`` with exactly error/errorNum/errorMessage/code, error
true and code equal to the HTTP status.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import ProxyFactory
from tests.processes import free_port
from tests.standin import StandIn
from tests.standin.client import ROOT, basic


def assert_arango_error(
    status: int, body: bytes, content_type: str, expected: int
) -> dict[str, object]:
    assert status == expected, body
    assert content_type == "application/json; charset=utf-8"
    doc: dict[str, object] = json.loads(body)
    assert set(doc) == {"error", "errorNum", "errorMessage", "code"}
    assert doc["error"] is True
    assert doc["code"] == status
    assert isinstance(doc["errorNum"], int)
    assert isinstance(doc["errorMessage"], str)
    assert doc["errorMessage"]
    return doc


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, **kw: object
) -> tuple[int, bytes, str]:
    async with http.request(method, url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


STORE = {**ROOT, "x-arango-async": "store"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected", "error_num"),
    [
        ("PUT", "/_api/job", ROOT, 400, 400),
        ("GET", "/_api/job/nope", ROOT, 400, 400),
        ("DELETE", "/_api/job/expired", ROOT, 400, 400),
        ("PUT", "/_api/job/12", ROOT, 404, 404),
        ("PUT", "/_api/job/12/cancel", ROOT, 404, 404),
        ("DELETE", "/_api/job/12", ROOT, 404, 404),
        ("POST", "/_api/job/12", ROOT, 405, 405),
        ("GET", "/_api/job/done", basic("alice", "bad"), 401, 11),
        ("GET", "/_db/nowhere/_api/job/done", ROOT, 404, 1228),
        ("PUT", "/_api/version", {**STORE, **basic("alice", "bad")}, 401, 11),
    ],
)
async def test_facade_and_intake_errors(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str],
    expected: int,
    error_num: int,
) -> None:
    proxy = await start_proxy(standin.url)
    status, body, content_type = await _call(http, method, proxy + path, headers=headers)
    doc = assert_arango_error(status, body, content_type, expected)
    assert doc["errorNum"] == error_num


async def test_body_too_large_is_413(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin.url, server={"max_body_size": 1000})
    status, body, ctype = await _call(
        http, "POST", proxy + "/_api/cursor", headers=STORE, data=b"x" * 1001
    )
    assert_arango_error(status, body, ctype, 413)

    async def chunked() -> object:
        for _ in range(20):
            yield b"y" * 100

    status, body, ctype = await _call(
        http, "POST", proxy + "/_api/cursor", headers=STORE, data=chunked()
    )
    assert_arango_error(status, body, ctype, 413)


async def test_slow_body_is_408(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin.url, server={"body_timeout": 0.2})

    async def slow() -> object:
        yield b"{"
        await asyncio.sleep(1.0)
        yield b"}"

    status, body, ctype = await _call(
        http, "POST", proxy + "/_api/cursor", headers=STORE, data=slow()
    )
    assert_arango_error(status, body, ctype, 408)


async def test_capacity_is_queue_full(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    standin.queue_full = True  # nothing leaves the proxy, so its capacity fills up
    proxy = await start_proxy(standin.url, jobs={"capacity": 3})
    for _ in range(3):
        status, _, _ = await _call(http, "PUT", proxy + "/_api/version", headers=STORE)
        assert status == 202
    status, body, ctype = await _call(http, "PUT", proxy + "/_api/version", headers=STORE)
    doc = assert_arango_error(status, body, ctype, 503)
    assert doc == {"error": True, "errorNum": 21003, "errorMessage": "queue is full", "code": 503}


async def test_unknown_credentials_with_upstream_down_is_503(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(f"http://127.0.0.1:{free_port()}")
    for method, path, headers in [
        ("PUT", "/_api/version", STORE),
        ("GET", "/_api/job/done", ROOT),
        ("GET", "/_api/version", ROOT),
    ]:
        status, body, ctype = await _call(http, method, proxy + path, headers=headers)
        doc = assert_arango_error(status, body, ctype, 503)
        assert "unreachable" in str(doc["errorMessage"])

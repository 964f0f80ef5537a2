"""Operations endpoints: health, readiness and metrics."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from proxy import ops
from tests.conftest import ProxyFactory
from tests.processes import free_port
from tests.standin import StandIn
from tests.standin.client import ROOT, Client


def metric(text: str, name: str) -> float:
    match = re.search(rf"^arango_async_proxy_{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from\n{text}"
    return float(match[1])


async def metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/_proxy/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        return await resp.text()


async def metric_reaches(http: aiohttp.ClientSession, base: str, name: str, value: float) -> str:
    """The metrics page once `name` is at least `value` (counters move after a reply)."""
    for _ in range(500):
        text = await metrics(http, base)
        if metric(text, name) >= value:
            return text
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} stayed below {value}:\n{text}")


async def test_ready_follows_arangodb(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin.url)
    async with http.get(proxy + "/_proxy/ready") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ready"}
    down = await start_proxy(f"http://127.0.0.1:{free_port()}")
    async with http.get(down + "/_proxy/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["errorNum"] == 503
    assert body["errorMessage"].startswith("not ready: upstream ArangoDB at")


async def test_metrics_count_the_job_flow(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    jobs = Client(http, await start_proxy(standin.url, jobs={"capacity": 2}))
    standin.queue_full = True
    first = await jobs.submit("GET", "/_api/version")
    await jobs.submit("GET", "/_api/version", mode="true")
    refused = await jobs.call("GET", "/_api/version", headers={**ROOT, "x-arango-async": "store"})
    assert refused.status == 503
    # until the dispatcher has met the full queue at least once
    await metric_reaches(http, jobs.base, "submit_retries_total", 1)
    standin.queue_full = False
    await jobs.result(first)
    # the fire-and-forget job is sent beside the first, but its 202 may come later
    text = await metric_reaches(http, jobs.base, "jobs_submitted_total", 2)
    assert metric(text, "jobs_accepted_total") == 2
    assert metric(text, "jobs_refused_total") == 1
    assert metric(text, "jobs_submitted_total") == 2
    assert metric(text, "submit_retries_total") >= 1
    assert metric(text, "jobs_lost_total") == 0
    assert metric(text, "store_commits") >= 3
    assert metric(text, "jobs_unfinished") <= 1  # the fire-and-forget one may still run
    assert "# TYPE arango_async_proxy_jobs_harvested_total counter" in text


async def test_ready_answers_503_when_arangodb_takes_the_connection_and_says_nothing(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe gets its answer within READY_TIMEOUT, not upstream.request_timeout."""
    monkeypatch.setattr(ops, "READY_TIMEOUT", 0.2)

    taken: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        base = await start_proxy(f"http://127.0.0.1:{port}")
        async with http.get(base + "/_proxy/ready") as resp:
            assert resp.status == 503
            body = await resp.json()
        for writer in taken:
            writer.close()
            await writer.wait_closed()
    assert body["errorNum"] == 503
    assert body["errorMessage"] == "not ready: upstream ArangoDB did not answer within 0.2 s"

"""Retention through the proxy, against the stand-in: jobs.result_ttl expires
unfetched results, jobs.max_result_bytes evicts the oldest; unfinished jobs stay;
each sweep is logged and counted. Waits are "eventually, within a generous
deadline", never timings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.retention import Retention
from storage import JobStore, Removed, StoredResponse
from tests.conftest import ProxyFactory
from tests.processes import ProxyProcess, free_port
from tests.standin import StandIn
from tests.standin.client import Client
from tests.test_ops import metric
from tests.test_store import new_job

DEADLINE = 20.0
UNKNOWN = "987654321"  # an id this proxy never gave out
SLOW = {"query": "RETURN SLEEP(60)"}  # unfinished for the whole test


async def gone(jobs: Client, job_id: str) -> None:
    """Wait until `job_id` is unknown to the proxy (asking its status, not fetching it)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        answer = await jobs.call("GET", f"/_api/job/{job_id}")
        if answer.status == 404:
            return
        assert answer.status in (200, 204), answer
        assert time.monotonic() < deadline, f"job {job_id} still there after {DEADLINE} s"
        await asyncio.sleep(0.02)


async def assert_unknown(jobs: Client, job_id: str) -> None:
    """The proxy answers for `job_id` exactly as for an id it never gave out."""
    for method, path in [("GET", "/_api/job/{}"), ("PUT", "/_api/job/{}")]:
        answer = await jobs.call(method, path.format(job_id))
        unknown = await jobs.call(method, path.format(UNKNOWN))
        assert (answer.status, answer.body) == (unknown.status, unknown.body), method
        assert answer.status == 404
        assert answer.json == {
            "code": 404,
            "error": True,
            "errorMessage": "not found",
            "errorNum": 404,
        }
    for which in ("done", "pending"):
        assert job_id not in (await jobs.call("GET", f"/_api/job/{which}")).json


async def metrics(jobs: Client) -> str:
    return (await jobs.call("GET", "/_proxy/metrics")).body.decode()


def retention_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "proxy.retention"]


async def test_results_unfetched_past_the_ttl_go_fresh_and_unfinished_ones_stay(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.retention")
    # 2 s: room for the fresh result to be fetched before it expires in its turn
    jobs = Client(http, await start_proxy(standin.url, jobs={"result_ttl": 2}))
    slow = await jobs.submit("POST", "/_api/cursor", body=SLOW)
    old = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(old)
    await gone(jobs, old)
    await assert_unknown(jobs, old)
    # Older than the TTL too, but unfinished: never touched.
    assert (await jobs.call("GET", f"/_api/job/{slow}")).status == 204
    assert slow in (await jobs.call("GET", "/_api/job/pending")).json
    # A fresh result is there to fetch.
    fresh = await jobs.submit("GET", "/_api/version")
    await jobs.wait_done(fresh)
    assert fresh in (await jobs.call("GET", "/_api/job/done")).json
    fetched = await jobs.result(fresh)
    assert fetched.status == 200
    assert fetched.json["server"] == "arango"

    text = await metrics(jobs)
    assert metric(text, "results_expired_total") == 1
    assert metric(text, "results_expired_bytes_total") > 0
    assert metric(text, "results_evicted_total") == 0
    [line] = retention_lines(caplog)
    assert line.startswith("retention: expired 1 unfetched result (")
    assert line.endswith("bytes), unfetched for longer than jobs.result_ttl = 2 s")


async def test_over_the_byte_cap_the_oldest_results_go_first(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each result is a bit over 10 kB (a 10,000-letter string): two fit in 25,000 bytes."""
    caplog.set_level(logging.INFO, logger="proxy.retention")
    cap = 25_000
    jobs = Client(http, await start_proxy(standin.url, jobs={"max_result_bytes": cap}))
    slow = await jobs.submit("POST", "/_api/cursor", body=SLOW)
    ids = {}
    for letter in "abcd":
        query = {"query": f'RETURN "{letter * 10_000}"'}
        ids[letter] = await jobs.submit("POST", "/_api/cursor", body=query)
        await jobs.wait_done(ids[letter])

    for letter in "ab":
        await gone(jobs, ids[letter])
        await assert_unknown(jobs, ids[letter])
    text = await metrics(jobs)
    assert metric(text, "results_evicted_total") == 2
    assert 2 * 10_000 < metric(text, "results_evicted_bytes_total") <= cap
    assert 2 * 10_000 < metric(text, "results_stored_bytes") <= cap
    assert metric(text, "results_expired_total") == 0
    lines = retention_lines(caplog)
    assert len(lines) in (1, 2)  # one line per sweep: the two may share one
    assert all(line.startswith("retention: evicted ") for line in lines)
    assert all(line.endswith(f"within jobs.max_result_bytes = {cap}") for line in lines)

    assert (await jobs.call("GET", f"/_api/job/{slow}")).status == 204
    for letter in "cd":
        answer = await jobs.result(ids[letter])
        assert answer.status == 201
        assert answer.json["result"] == [letter * 10_000]
    for _ in range(200):  # the deletes of fetched results commit in the background
        if metric(await metrics(jobs), "results_stored_bytes") == 0:
            break
        await asyncio.sleep(0.005)
    assert metric(await metrics(jobs), "results_stored_bytes") == 0


async def test_retention_is_off_by_default(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.retention")
    jobs = Client(http, await start_proxy(standin.url))
    job = await jobs.submit("POST", "/_api/cursor", body={"query": f'RETURN "{"x" * 100_000}"'})
    await jobs.wait_done(job)
    text = await metrics(jobs)
    assert metric(text, "results_stored_bytes") > 100_000
    assert metric(text, "results_expired_total") == metric(text, "results_evicted_total") == 0
    assert (await jobs.result(job)).status == 201
    assert retention_lines(caplog) == []


async def test_a_lowered_cap_applies_when_the_proxy_starts_again_on_its_data(
    standin: StandIn,
    proxy_process: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Real processes: results stored without a cap, then a restart with one. The
    stand-in runs in this event loop, so blocking process calls go to a thread."""
    data = tmp_path / "proxy-data"
    first = await asyncio.to_thread(proxy_process, "--upstream", standin.url, data=data)
    jobs = Client(http, first.url)
    ids = {}
    for letter in "abc":
        ids[letter] = await jobs.submit(
            "POST", "/_api/cursor", body={"query": f'RETURN "{letter * 10_000}"'}
        )
        await jobs.wait_done(ids[letter])
    assert await asyncio.to_thread(first.stop) == 0

    config = tmp_path / "capped.toml"
    config.write_text("[jobs]\nmax_result_bytes = 25000\n")
    listen = f"127.0.0.1:{free_port()}"
    args = ("--config", str(config), "--listen", listen, "--upstream", standin.url)
    second = await asyncio.to_thread(proxy_process, *args, data=data)
    jobs = Client(http, second.url)
    await gone(jobs, ids["a"])
    for letter in "bc":
        answer = await jobs.result(ids[letter])
        assert answer.json["result"] == [letter * 10_000]
    assert metric(await metrics(jobs), "results_evicted_total") == 1
    assert await asyncio.to_thread(second.stop) == 0
    [line] = [line for line in "".join(second.output).splitlines() if "retention:" in line]
    assert "evicted 1 unfetched result (" in line
    assert line.endswith("within jobs.max_result_bytes = 25000")


async def test_a_store_over_the_cap_is_trimmed_at_start_and_failures_are_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lowered cap applies at once. Then the store is closed under the sweeps: a real
    failure, which each loop logs and retries instead of dying."""
    caplog.set_level(logging.INFO, logger="proxy.retention")
    store = await JobStore.open(tmp_path)
    try:
        for _ in range(3):
            job_id = await store.accept(new_job())
            await store.finish(job_id, StoredResponse(200, (), b"x" * 1000))
        counts: Counter[str] = Counter()
        retention = Retention(store, ttl=3600, max_bytes=1500, metrics=counts)
        task = asyncio.create_task(retention.run())
        deadline = time.monotonic() + DEADLINE
        while store.result_bytes > 1500:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert store.result_bytes == 1002  # a body of 1000 and "[]" for no headers
        assert counts == Counter(results_evicted_total=2, results_evicted_bytes_total=2004)
        assert await retention.expire() == Removed(0, 0)  # all fresh: nothing expires
    finally:
        await store.close()
    # The expiry loop fails on the closed store; so does an eviction due at start.
    over = Retention(store, ttl=0, max_bytes=500, metrics=counts)
    tasks = [task, asyncio.create_task(over.run())]
    deadline = time.monotonic() + DEADLINE
    while sum("retention sweep failed" in r.getMessage() for r in caplog.records) < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    for running in tasks:
        assert not running.done()  # failing, retrying, alive
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

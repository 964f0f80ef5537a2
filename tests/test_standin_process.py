"""`python -m tests.standin` as a real process, with its `/_standin/` controls."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.processes import StandInProcess
from tests.standin.__main__ import parse_args, parse_users
from tests.standin.client import ALICE, ROOT, Client, basic


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_process_serves_and_stops_cleanly(signum: int) -> None:
    proc = StandInProcess.start("--users", "root:,alice:alicepw", "--workers", "2")
    started = f"listening on {proc.url}\n"
    try:
        # (one line, which may have come in more than one read of the pipe)
        assert "".join(proc.output) == started
        async with aiohttp.ClientSession() as session:
            client = Client(session, proc.url)
            answer = await client.call("GET", "/_api/version", user=ALICE)
            assert answer.json["version"] == "3.12.4"
            assert (
                await client.call("GET", "/_api/version", user=basic("bob", "bobpw"))
            ).status == 401
    finally:
        code = proc.stop(signum)
    assert code == 0
    assert "".join(proc.output) == started  # exactly one line, nothing at shutdown


async def test_process_controls() -> None:
    proc = StandInProcess.start("--queue-size", "4")
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(session, proc.url)
            await client.call("POST", "/_api/collection", {"name": "c"})
            job_id = await client.submit("POST", "/_api/document/c", {"_key": "k"})
            await client.wait_done(job_id)
            await client.call("POST", "/_api/document/c", {"_key": "k"})
            counters = (await client.call("GET", "/_standin/counters", user={})).json
            assert counters["writes"] == {"_system/c/k": 2}
            first, second = counters["repeats"]["_system/c/k"]  # when each write ran
            assert first <= second
            assert counters["executed"]["POST /_api/document/c"] == 2
            # every request served, a job id as {id}; the controls are not counted
            requests = counters["requests"]
            assert requests.keys() == {
                "POST /_api/collection",
                "POST /_api/document/c",
                "GET /_api/job/{id}",
            }
            assert requests["POST /_api/document/c"] == 2
            assert requests["GET /_api/job/{id}"] >= 1

            full = await client.call("PUT", "/_standin/queue-full", b"true", user={})
            assert full.json == {"queueFull": True}
            refused = await client.call("GET", "/_api/version", headers={"x-arango-async": "store"})
            assert (refused.status, refused.json["errorNum"]) == (503, 21003)
            assert (
                await client.call("PUT", "/_standin/queue-full", b"maybe", user={})
            ).status == 400
            await client.call("PUT", "/_standin/queue-full", b"false", user={})

            done = await client.submit("GET", "/_api/version")
            await client.wait_done(done)
            assert (await client.call("POST", "/_standin/restart", user={})).status == 200
            assert (await client.call("GET", f"/_api/job/{done}")).status == 404
            after = await client.submit("GET", "/_api/version", user=ROOT)
            assert int(after) > int(done)
            assert (await client.call("GET", "/_api/document/c/k")).status == 200
    finally:
        assert proc.stop() == 0


async def test_process_without_auth() -> None:
    proc = StandInProcess.start("--no-auth", "--jwt-secret", "s")
    try:
        async with aiohttp.ClientSession() as session:
            answer = await Client(session, proc.url).call("GET", "/_api/version", user={})
            assert answer.status == 200
    finally:
        assert proc.stop() == 0


def test_arguments() -> None:
    args = parse_args(["--users", "root:,alice:a:b", "--no-auth", "--queue-size", "7"])
    assert args.users == {"root": "", "alice": "a:b"}
    assert (args.no_auth, args.queue_size, args.workers, args.port) == (True, 7, 4, 0)
    assert parse_args([]).users == {"root": "", "alice": "alicepw", "bob": "bobpw"}
    with pytest.raises(Exception, match="NAME:PASSWORD"):
        parse_users("justaname")


async def test_outage_refuses_connections_and_keeps_everything() -> None:
    proc = StandInProcess.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(session, proc.url)
            await client.call("POST", "/_api/collection", {"name": "c"})
            done = await client.submit("POST", "/_api/document/c", {"_key": "k"})
            await client.wait_done(done)
            bad = await client.call("POST", "/_standin/outage?seconds=x", user={})
            assert bad.status == 400
            went = await client.call("POST", "/_standin/outage?seconds=1.5", user={})
            assert went.json == {"outage": 1.5}
            # Gone: new connections are refused (no timing: wait until it happens).
            for _ in range(200):
                try:
                    await client.call("GET", "/_api/version")
                except aiohttp.ClientConnectionError:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the stand-in never went away")
            # Back on the same address, with the job result and the document kept.
            for _ in range(500):
                try:
                    back = await client.call("PUT", f"/_api/job/{done}")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("the stand-in never came back")
            assert back.status == 202  # the insert's own reply (waitForSync false)
            assert back.async_id == done
            assert (await client.call("GET", "/_api/document/c/k")).status == 200
    finally:
        assert proc.stop() == 0

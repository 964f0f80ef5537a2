"""Async execution in the stand-in: the header, the 202, job ids, the bounded
queue, restart, and who may see which job (spec §1, §8, §10, §11)."""

from __future__ import annotations

import aiohttp
import pytest

from tests.standin import StandIn, make_jwt
from tests.standin.client import ALICE, BOB, ROOT, Client, basic, eventually
from tests.standin.pytest_plugin import StandInFactory

QUEUE_FULL = b'{"error":true,"errorNum":21003,"errorMessage":"queue is full","code":503}'
SLEEP = {"query": "RETURN SLEEP(5)"}


async def test_store_reply_is_an_empty_202_with_the_id(standin_client: Client) -> None:
    answer = await standin_client.call("GET", "/_api/version", headers={"x-arango-async": "store"})
    assert answer.status == 202
    assert answer.body == b""
    assert answer.headers["content-length"] == "0"
    assert answer.content_type == "text/plain"
    assert answer.headers["server"] == "ArangoDB"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.async_id is not None
    assert answer.async_id.isdigit()
    assert answer.async_id[0] != "0"
    assert "content-encoding" not in answer.headers


async def test_fire_and_forget_runs_without_an_id(standin: StandIn, standin_client: Client) -> None:
    await standin_client.call("POST", "/_api/collection", {"name": "f"})
    answer = await standin_client.call(
        "POST", "/_api/document/f", {"_key": "x"}, headers={"x-arango-async": "true"}
    )
    assert (answer.status, answer.body, answer.async_id) == (202, b"", None)
    assert answer.content_type == "text/plain"
    await eventually(lambda: standin.write_count("_system", "f", "x") == 1)
    assert (await standin_client.call("GET", "/_api/document/f/x")).status == 200
    for kind in ("done", "pending"):
        assert (await standin_client.call("GET", f"/_api/job/{kind}")).json == []


@pytest.mark.parametrize("value", ["TRUE", "Store", "false", "1", "", "stored"])
async def test_other_header_values_run_synchronously(standin_client: Client, value: str) -> None:
    answer = await standin_client.call("GET", "/_api/version", headers={"x-arango-async": value})
    assert answer.status == 200
    assert answer.json["version"] == "3.12.4"
    assert answer.async_id is None


async def test_ids_increase_with_gaps_from_the_shared_tick(standin_client: Client) -> None:
    await standin_client.call("POST", "/_api/collection", {"name": "t"})
    first = int(await standin_client.submit("GET", "/_api/version"))
    second = int(await standin_client.submit("GET", "/_api/version"))
    await standin_client.call("POST", "/_api/document/t", {"a": 1})  # takes a tick
    third = int(await standin_client.submit("GET", "/_api/version"))
    assert 0 < first < second < third
    assert third - second >= 2


async def test_nothing_is_exempt_from_async(standin_client: Client) -> None:
    first = await standin_client.submit("GET", "/_api/version")
    await standin_client.wait_done(first)
    # the job API itself: an async fetch consumes the first job's result
    second = await standin_client.submit("PUT", f"/_api/job/{first}")
    answer = await standin_client.result(second)
    assert answer.status == 200
    assert answer.json["server"] == "arango"
    assert answer.headers.getall("x-arango-async-id") == [second]
    assert (await standin_client.call("PUT", f"/_api/job/{first}")).status == 404
    listing = await standin_client.submit("GET", "/_api/job/pending")
    assert (await standin_client.result(listing)).json == [listing]  # it was running


async def test_async_and_sync_run_the_same_handler(
    standin: StandIn, standin_client: Client
) -> None:
    await standin_client.call("POST", "/_api/collection", {"name": "d"})
    sync = await standin_client.call("POST", "/_api/document/d", {"_key": "a"})
    assert sync.status == 202
    job_id = await standin_client.submit("POST", "/_api/document/d", {"_key": "a"})
    stored = await standin_client.result(job_id)
    direct = await standin_client.call("POST", "/_api/document/d", {"_key": "a"})
    assert stored.status == direct.status == 409
    assert stored.body == direct.body
    assert standin.write_count("_system", "d", "a") == 3
    assert standin.executed[("POST", "/_api/document/d")] == 3


# -- the bounded queue ---------------------------------------------------------


async def test_queue_full_flag_refuses_async_only(standin: StandIn, standin_client: Client) -> None:
    standin.queue_full = True
    for mode in ("store", "true"):
        answer = await standin_client.call("PUT", "/_api/version", headers={"x-arango-async": mode})
        assert answer.status == 503
        assert answer.body == QUEUE_FULL
        assert answer.content_type == "application/json; charset=utf-8"
        assert answer.async_id is None
    assert (await standin_client.call("GET", "/_api/version")).status == 200
    # unlike ArangoDB's quirk (spec §10.1) no orphaned pending entry is left
    assert (await standin_client.call("GET", "/_api/job/pending")).json == []
    standin.queue_full = False
    assert await standin_client.submit("GET", "/_api/version")


async def test_the_queue_holds_queue_size_waiting_jobs(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> None:
    server = await standin_factory(workers=1, queue_size=2)
    client = Client(standin_http, server.url)
    running = await client.submit("POST", "/_api/cursor", SLEEP)
    await eventually(server.scheduler.queue.empty)
    waiting = [await client.submit("GET", "/_api/version") for _ in range(2)]
    refused = await client.call("GET", "/_api/version", headers={"x-arango-async": "store"})
    assert (refused.status, refused.body) == (503, QUEUE_FULL)
    pending = (await client.call("GET", "/_api/job/pending")).json
    assert sorted(pending) == sorted([running, *waiting])
    await client.call("PUT", f"/_api/job/{running}/cancel")
    for job_id in waiting:
        assert (await client.result(job_id)).status == 200
    assert await client.submit("GET", "/_api/version")


async def test_a_slow_query_is_still_pending_on_the_next_request(standin_client: Client) -> None:
    job_id = await standin_client.submit("POST", "/_api/cursor", {"query": "RETURN SLEEP(0.1)"})
    assert (await standin_client.call("GET", f"/_api/job/{job_id}")).status == 204
    answer = await standin_client.result(job_id)
    assert (answer.status, answer.json["result"]) == (201, [None])


async def test_queue_time_header_is_checked_before_queueing(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> None:
    server = await standin_factory(workers=1)
    client = Client(standin_http, server.url)
    sleeper = await client.submit("POST", "/_api/cursor", {"query": "RETURN SLEEP(0.2)"})
    queued = await client.submit("GET", "/_api/version")
    await client.wait_done(queued)  # it waited about 0.2 s in the queue
    assert server.scheduler.last_wait > 0.1
    answer = await client.call(
        "GET", "/_api/version", headers={"x-arango-queue-time-seconds": "0.05"}
    )
    assert answer.status == 412
    assert answer.body == (
        b'{"error":true,"errorNum":21004,"errorMessage":"queue time violated","code":412}'
    )
    assert float(answer.headers["x-arango-queue-time-seconds"]) > 0.1
    for limit in ("10", "0", "abc"):
        headers = {"x-arango-queue-time-seconds": limit}
        assert (await client.call("GET", "/_api/version", headers=headers)).status == 200
    assert (await client.result(sleeper)).status == 201


# -- restart -------------------------------------------------------------------


async def test_restart_loses_jobs_and_cursors_but_keeps_data_and_ticks(
    standin: StandIn, standin_client: Client
) -> None:
    await standin_client.call("POST", "/_api/collection", {"name": "keep"})
    for i in range(3):
        await standin_client.call("POST", "/_api/document/keep", {"_key": f"k{i}"})
    cursor = (
        await standin_client.call(
            "POST", "/_api/cursor", {"query": "FOR d IN keep RETURN d", "batchSize": 1}
        )
    ).json["id"]
    done = await standin_client.submit("GET", "/_api/version")
    await standin_client.wait_done(done)
    running = await standin_client.submit("POST", "/_api/cursor", SLEEP)
    await standin.restart()
    for job_id in (done, running):
        assert (await standin_client.call("GET", f"/_api/job/{job_id}")).status == 404
        assert (await standin_client.call("PUT", f"/_api/job/{job_id}")).status == 404
    for kind in ("done", "pending"):
        assert (await standin_client.call("GET", f"/_api/job/{kind}")).json == []
    assert (await standin_client.call("POST", f"/_api/cursor/{cursor}")).json["errorNum"] == 1600
    assert (await standin_client.call("GET", "/_api/document/keep/k2")).status == 200
    after = await standin_client.submit("GET", "/_api/version")
    assert int(after) > int(running)
    assert (await standin_client.result(after)).status == 200


async def test_restart_drops_queued_work(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> None:
    server = await standin_factory(workers=1)
    client = Client(standin_http, server.url)
    await client.call("POST", "/_api/collection", {"name": "q"})
    await client.submit("POST", "/_api/cursor", SLEEP)
    await client.submit("POST", "/_api/document/q", {"_key": "never"})
    await server.restart()
    marker = await client.submit("GET", "/_api/version")
    await client.wait_done(marker)
    assert server.write_count("_system", "q", "never") == 0


# -- users (spec §8) -----------------------------------------------------------


async def test_another_users_job_is_like_a_missing_one(standin_client: Client) -> None:
    job_id = await standin_client.submit("GET", "/_api/version", user=ALICE)
    await standin_client.wait_done(job_id, user=ALICE)
    not_found = {"code": 404, "error": True, "errorMessage": "not found", "errorNum": 404}
    for who in (BOB, ROOT):  # Basic root is not a superuser
        assert (await standin_client.call("GET", f"/_api/job/{job_id}", user=who)).json == not_found
        assert (await standin_client.call("PUT", f"/_api/job/{job_id}", user=who)).status == 404
        assert (
            await standin_client.call("PUT", f"/_api/job/{job_id}/cancel", user=who)
        ).status == 404
        assert (await standin_client.call("DELETE", f"/_api/job/{job_id}", user=who)).status == 404
        assert (await standin_client.call("GET", "/_api/job/done", user=who)).json == []
        for path in ("/_api/job/all", "/_api/job/expired?stamp=99999999999"):
            assert (await standin_client.call("DELETE", path, user=who)).status == 200
    assert (await standin_client.call("GET", "/_api/job/done", user=ALICE)).json == [job_id]
    assert (await standin_client.result(job_id, user=ALICE)).status == 200


async def test_jwt_superuser_sees_every_job(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> None:
    server = await standin_factory(jwt_secret="s3cret")
    client = Client(standin_http, server.url)
    superuser = {
        "authorization": "bearer " + make_jwt("s3cret", {"iss": "arangodb", "server_id": "x"})
    }
    as_bob = {
        "authorization": "Bearer "
        + make_jwt("s3cret", {"iss": "arangodb", "preferred_username": "bob"})
    }
    alices = await client.submit("GET", "/_api/version", user=ALICE)
    bobs = await client.submit("GET", "/_api/version", user=as_bob)
    await client.wait_done(alices, user=superuser)
    await client.wait_done(bobs, user=superuser)
    assert sorted((await client.call("GET", "/_api/job/done", user=superuser)).json) == sorted(
        [alices, bobs]
    )
    # a token with a user name is that user, the same as Basic bob
    assert (await client.call("GET", "/_api/job/done", user=BOB)).json == [bobs]
    assert (await client.call("GET", "/_api/job/done", user=as_bob)).json == [bobs]
    assert (await client.result(alices, user=superuser)).status == 200


async def test_without_auth_the_anonymous_caller_is_superuser(
    standin_noauth: StandIn, standin_http: aiohttp.ClientSession
) -> None:
    client = Client(standin_http, standin_noauth.url)
    anonymous: dict[str, str] = {}
    alices = await client.submit("GET", "/_api/version", user=basic("alice", "wrong"))
    roots = await client.submit("GET", "/_api/version", user=ROOT)
    await client.wait_done(alices, user=anonymous)
    await client.wait_done(roots, user=anonymous)
    assert sorted((await client.call("GET", "/_api/job/done", user=anonymous)).json) == sorted(
        [alices, roots]
    )
    # a Basic user name still scopes the jobs, as python-arango's root: does
    assert (await client.call("GET", "/_api/job/done", user=ROOT)).json == [roots]
    assert (await client.call("GET", f"/_api/job/{alices}", user=ROOT)).status == 404

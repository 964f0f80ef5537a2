"""The stand-in's job API, row by row of spec §2-§6 (PUT, cancel, DELETE, GET id, GET list)."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.standin import StandIn
from tests.standin.client import ROOT, Answer, Client, eventually
from tests.standin.pytest_plugin import StandInFactory

BAD_PARAMETER = {"code": 400, "error": True, "errorMessage": "bad parameter", "errorNum": 400}
NOT_FOUND = {"code": 404, "error": True, "errorMessage": "not found", "errorNum": 404}
NOT_ALLOWED = {"code": 405, "error": True, "errorMessage": "method not supported", "errorNum": 405}
JSON = "application/json; charset=utf-8"
SLEEP = {"query": "RETURN SLEEP(5)"}


def assert_handler_error(answer: Answer, status: int, doc: dict[str, object]) -> None:
    assert answer.status == status, answer
    assert answer.content_type == JSON
    assert answer.body.decode() == (
        f'{{"code":{doc["code"]},"error":true,"errorMessage":"{doc["errorMessage"]}",'
        f'"errorNum":{doc["errorNum"]}}}'
    )
    assert answer.async_id is None


@pytest.fixture
async def one_worker(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> tuple[StandIn, Client]:
    """A stand-in with one worker, so a second job stays queued behind a SLEEP."""
    server = await standin_factory(workers=1)
    return server, Client(standin_http, server.url)


async def occupy_worker(client: Client, server: StandIn) -> str:
    """Start a long SLEEP and wait until a worker has taken it off the queue."""
    job_id = await client.submit("POST", "/_api/cursor", SLEEP)
    await eventually(server.scheduler.queue.empty)
    return job_id


# -- §2 PUT /_api/job/{id} -----------------------------------------------------


async def test_fetch_returns_the_original_response_once(standin_client: Client) -> None:
    await standin_client.call("POST", "/_api/collection", {"name": "c"})
    job_id = await standin_client.submit("POST", "/_api/document/c?returnNew=true", {"_key": "k"})
    await standin_client.wait_done(job_id)
    answer = await standin_client.call("PUT", f"/_api/job/{job_id}")
    assert answer.status == 202  # the insert's own status
    assert answer.async_id == job_id
    assert answer.content_type == JSON
    body = answer.json
    assert list(body) == ["_id", "_key", "_rev", "new"]
    assert body["_id"] == "c/k"
    assert answer.headers["etag"] == f'"{body["_rev"]}"'
    assert answer.headers["location"] == "/_db/_system/_api/document/c/k"
    assert answer.headers["server"] == "ArangoDB"
    # erased on fetch
    assert_handler_error(await standin_client.call("PUT", f"/_api/job/{job_id}"), 404, NOT_FOUND)
    assert_handler_error(await standin_client.call("GET", f"/_api/job/{job_id}"), 404, NOT_FOUND)


async def test_fetch_keeps_error_results_and_echoes_the_id_text(standin_client: Client) -> None:
    job_id = await standin_client.submit("PUT", "/_api/collection")
    await standin_client.wait_done(job_id)
    # the id is parsed as leading digits, the header repeats the text as sent
    answer = await standin_client.call("PUT", f"/_api/job/00{job_id}")
    assert answer.status == 400
    assert answer.async_id == f"00{job_id}"
    assert answer.json == {
        "code": 400,
        "error": True,
        "errorMessage": "expected PUT /_api/collection/<collection-name>/<action>",
        "errorNum": 400,
    }


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/_api/job", 400, BAD_PARAMETER),
        ("/_api/job/notthere", 404, NOT_FOUND),
        ("/_api/job/99999999999999", 404, NOT_FOUND),
        ("/_api/job/1/2/3", 400, BAD_PARAMETER),
        ("/_api/job/123/foo", 400, BAD_PARAMETER),
    ],
)
async def test_put_errors(
    standin_client: Client, path: str, status: int, body: dict[str, object]
) -> None:
    assert_handler_error(await standin_client.call("PUT", path), status, body)


async def test_fetch_of_pending_job_is_204_and_keeps_it(standin_client: Client) -> None:
    job_id = await standin_client.submit("POST", "/_api/cursor", SLEEP)
    for _ in range(2):
        answer = await standin_client.call("PUT", f"/_api/job/{job_id}")
        assert answer.status == 204
        assert answer.body == b""
        assert answer.async_id is None
        assert answer.content_type == "text/plain"
    assert (await standin_client.call("GET", "/_api/job/pending")).json == [job_id]


# -- §3 PUT /_api/job/{id}/cancel ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("notthere", 0), ("18446744073709551616", 0), ("123abc", 123), ("99999999999", 99999999999)],
)
async def test_cancel_unknown_names_the_parsed_id(
    standin_client: Client, text: str, parsed: int
) -> None:
    message = f"could not find job ({parsed}) in AsyncJobManager during cancel operation"
    answer = await standin_client.call("PUT", f"/_api/job/{text}/cancel")
    assert_handler_error(answer, 404, {"code": 404, "errorMessage": message, "errorNum": 404})


async def test_cancel_of_a_done_job_changes_nothing(standin_client: Client) -> None:
    job_id = await standin_client.submit("GET", "/_api/version")
    await standin_client.wait_done(job_id)
    answer = await standin_client.call("PUT", f"/_api/job/{job_id}/cancel")
    assert (answer.status, answer.body, answer.content_type) == (200, b'{"result":true}', JSON)
    result = await standin_client.result(job_id)
    assert result.status == 200
    assert result.json["server"] == "arango"


async def test_cancel_of_a_queued_job_stores_410_21(one_worker: tuple[StandIn, Client]) -> None:
    server, client = one_worker
    sleeper = await occupy_worker(client, server)
    queued = await client.submit("PUT", "/_api/version")
    for _ in range(2):  # a second cancel is fine too
        assert (await client.call("PUT", f"/_api/job/{queued}/cancel")).status == 200
    # cancel does not remove the entry: still pending until a worker picks it up
    assert sorted((await client.call("GET", "/_api/job/pending")).json) == [sleeper, queued]
    assert (await client.call("PUT", f"/_api/job/{sleeper}/cancel")).status == 200
    answer = await client.result(queued)
    assert answer.status == 410
    assert answer.body == (
        b'{"code":410,"error":true,"errorMessage":"canceled request","errorNum":21}'
    )
    assert server.executed[("PUT", "/_api/version")] == 0  # never ran


async def test_cancel_of_a_running_sleep_kills_the_query(
    one_worker: tuple[StandIn, Client],
) -> None:
    server, client = one_worker
    sleeper = await occupy_worker(client, server)
    assert (await client.call("PUT", f"/_api/job/{sleeper}/cancel")).json == {"result": True}
    answer = await client.result(sleeper)  # a SLEEP that ran to its end would be a 201
    assert answer.status == 410
    assert answer.body == b'{"code":410,"error":true,"errorMessage":"query killed","errorNum":1500}'


# -- §4 DELETE /_api/job/{type-or-id} ------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/_api/job", 400, BAD_PARAMETER),
        ("/_api/job/a/b", 400, BAD_PARAMETER),
        ("/_api/job/expired", 400, BAD_PARAMETER),
        ("/_api/job/AreYouThere", 404, NOT_FOUND),
        ("/_api/job/99999999999", 404, NOT_FOUND),
    ],
)
async def test_delete_errors(
    standin_client: Client, path: str, status: int, body: dict[str, object]
) -> None:
    assert_handler_error(await standin_client.call("DELETE", path), status, body)


async def test_delete_one_done_and_one_pending(one_worker: tuple[StandIn, Client]) -> None:
    server, client = one_worker
    done = await client.submit("GET", "/_api/version")
    await client.wait_done(done)
    sleeper = await client.submit("POST", "/_api/cursor", {"query": "RETURN SLEEP(0.1)"})
    for job_id in (done, sleeper):
        answer = await client.call("DELETE", f"/_api/job/{job_id}")
        assert (answer.status, answer.json) == (200, {"result": True})
        assert (await client.call("GET", f"/_api/job/{job_id}")).status == 404
    # a job queued behind the sleeper finishes after it: then the sleeper is over too
    marker = await client.submit("GET", "/_api/version")
    await client.wait_done(marker)
    assert server.executed[("POST", "/_api/cursor")] == 1  # it did run
    assert (await client.call("GET", "/_api/job/done")).json == [marker]
    assert (await client.call("PUT", f"/_api/job/{sleeper}")).status == 404


async def test_delete_all_removes_pending_and_done(one_worker: tuple[StandIn, Client]) -> None:
    _, client = one_worker
    done = await client.submit("GET", "/_api/version")
    await client.wait_done(done)
    await client.submit("POST", "/_api/cursor", {"query": "RETURN SLEEP(0.05)"})
    answer = await client.call("DELETE", "/_api/job/all")
    assert (answer.status, answer.json) == (200, {"result": True})
    marker = await client.submit("GET", "/_api/version")
    await client.wait_done(marker)
    assert (await client.call("GET", "/_api/job/done")).json == [marker]
    assert (await client.call("GET", "/_api/job/pending")).json == []


async def test_delete_expired_uses_creation_or_completion_time(
    standin_client: Client,
) -> None:
    done = await standin_client.submit("GET", "/_api/version")
    await standin_client.wait_done(done)
    middle = time.time()
    pending = await standin_client.submit("POST", "/_api/cursor", SLEEP)
    for stamp in ("abc", "-5", "0", f"{middle - 60:.3f}"):
        answer = await standin_client.call("DELETE", f"/_api/job/expired?stamp={stamp}")
        assert (answer.status, answer.json) == (200, {"result": True})
        assert (await standin_client.call("GET", "/_api/job/done")).json == [done]
    await standin_client.call("DELETE", f"/_api/job/expired?stamp={middle:.6f}")
    assert (await standin_client.call("GET", "/_api/job/done")).json == []
    assert (await standin_client.call("GET", "/_api/job/pending")).json == [pending]
    # an exponent is understood as well; pending jobs count from their creation
    await standin_client.call("DELETE", "/_api/job/expired?stamp=1e12")
    assert (await standin_client.call("GET", "/_api/job/pending")).json == []


# -- §5 GET /_api/job/{id} -----------------------------------------------------


async def test_get_status_of_done_pending_unknown(standin_client: Client) -> None:
    done = await standin_client.submit("GET", "/_api/version")
    await standin_client.wait_done(done)
    pending = await standin_client.submit("POST", "/_api/cursor", SLEEP)
    answer = await standin_client.call("GET", f"/_api/job/{done}")
    assert (answer.status, answer.body, answer.content_type) == (200, b"", "text/plain")
    assert answer.async_id is None
    answer = await standin_client.call("GET", f"/_api/job/{pending}")
    assert (answer.status, answer.body, answer.content_type) == (204, b"", "text/plain")
    # status does not consume the result
    assert (await standin_client.result(done)).status == 200
    for path in ("/_api/job/18446744073709551615", "/_api/job/99999999999999999999999"):
        assert_handler_error(await standin_client.call("GET", path), 404, NOT_FOUND)
    # leading digits are the id: "<id>abc" is that job
    assert (await standin_client.call("GET", f"/_api/job/{pending}abc")).status == 204


# -- §6 GET /_api/job/{type} ---------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/_api/job", "/_api/job/foo", "/_api/job/0", "/_api/job/all", "/_api/job/1/2"],
)
async def test_get_bad_type(standin_client: Client, path: str) -> None:
    assert_handler_error(await standin_client.call("GET", path), 400, BAD_PARAMETER)


async def test_list_counts(standin_client: Client) -> None:
    ids = [await standin_client.submit("GET", "/_api/version") for _ in range(101)]
    for job_id in ids:
        await standin_client.wait_done(job_id)
    expected = {"": 100, "?count=0": 1, "?count=abc": 1, "?count=2": 2, "?count=1000": 101}
    for query, length in expected.items():
        answer = await standin_client.call("GET", f"/_api/job/done{query}")
        assert answer.status == 200
        assert answer.content_type == JSON
        assert len(answer.json) == length, query
        assert all(isinstance(i, str) and i in ids for i in answer.json)
    assert (await standin_client.call("GET", "/_api/job/pending")).body == b"[]"


# -- methods, aliases, databases -----------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_other_methods_are_405(standin_client: Client, method: str) -> None:
    answer = await standin_client.call(method, "/_api/job/1")
    assert_handler_error(answer, 405, NOT_ALLOWED)


async def test_head_is_405_without_body(standin_client: Client) -> None:
    answer = await standin_client.call("HEAD", "/_api/job/done")
    assert (answer.status, answer.body) == (405, b"")


async def test_jobs_are_not_per_database(standin_client: Client) -> None:
    created = await standin_client.call("POST", "/_api/database", {"name": "other"})
    assert created.status == 201
    job_id = await standin_client.submit("GET", "/_db/other/_api/version")
    await standin_client.wait_done(job_id)
    answer = await standin_client.call("GET", f"/_db/_system/_admin/job/{job_id}")
    assert answer.status == 200
    assert (await standin_client.call("GET", "/_db/other/_admin/job/done")).json == [job_id]
    answer = await standin_client.call("PUT", f"/_admin/job/{job_id}", user=ROOT)
    assert (answer.status, answer.async_id) == (200, job_id)

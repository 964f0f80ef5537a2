"""The stand-in's AQL subset and cursor API (spec §12.5-§12.7)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.standin import StandIn
from tests.standin.aql import Query
from tests.standin.client import Client
from tests.standin.data import Store, Ticks


async def query(client: Client, text: str, **options: Any) -> Any:
    answer = await client.call("POST", "/_api/cursor", {"query": text, **options})
    return answer.status, answer.json


@pytest.fixture
async def docs(standin_client: Client) -> str:
    await standin_client.call("POST", "/_api/collection", {"name": "docs"})
    for i in range(7):
        doc = {"_key": f"k{i}", "i": i, "even": i % 2 == 0}
        assert (await standin_client.call("POST", "/_api/document/docs", doc)).status == 202
    return "docs"


async def test_return_values(standin_client: Client) -> None:
    status, body = await query(standin_client, 'return {"a": [1, 2.5, null, "x"]}')
    assert status == 201
    assert list(body) == ["result", "hasMore", "extra", "cached", "error", "code"]
    assert body["result"] == [{"a": [1, 2.5, None, "x"]}]
    assert (body["hasMore"], body["cached"], body["error"], body["code"]) == (
        False,
        False,
        False,
        201,
    )
    assert body["extra"]["warnings"] == []
    assert body["extra"]["stats"]["writesExecuted"] == 0
    _, body = await query(standin_client, "RETURN @v", bindVars={"v": {"n": 1}})
    assert body["result"] == [{"n": 1}]
    _, body = await query(standin_client, "RETURN SLEEP(0.01)")
    assert body["result"] == [None]
    _, body = await query(standin_client, 'RETURN SLEEP("x")')
    assert body["extra"]["warnings"][0]["code"] == 1542


@pytest.mark.parametrize(
    ("body", "status", "error_num"),
    [
        ({"query": "RETURN @missing"}, 400, 1551),
        ({"query": "RETURN 1", "bindVars": {"unused": 1}}, 400, 1552),
        ({"query": "FOR x IN nope RETURN x"}, 404, 1203),
        ({"query": "INSERT {} INTO nope"}, 404, 1203),
        ({"query": "RETURN 1", "batchSize": 0}, 400, 17),
        ({"query": "SELECT * FROM t"}, 400, 1501),
        ({"query": "RETURN {a: 1"}, 400, 1501),
        ({"query": "FOR d IN docs RETURN e"}, 400, 1501),
        ({"query": ""}, 400, 1502),
        ({"query": 5}, 400, 1502),
        ({}, 400, 1502),
    ],
)
async def test_query_errors(
    standin_client: Client, docs: str, body: dict[str, Any], status: int, error_num: int
) -> None:
    answer = await standin_client.call("POST", "/_api/cursor", body)
    assert answer.status == status
    assert list(answer.json) == ["code", "error", "errorMessage", "errorNum"]
    assert (answer.json["code"], answer.json["errorNum"]) == (status, error_num)
    if error_num == 1501:
        assert answer.json["errorMessage"].startswith("syntax error, ")


async def test_invalid_json_body(standin_client: Client) -> None:
    answer = await standin_client.call("POST", "/_api/cursor", b"{oops")
    assert (answer.status, answer.json["errorNum"]) == (400, 600)


async def test_for_filter_limit(standin_client: Client, docs: str) -> None:
    _, body = await query(standin_client, "FOR d IN docs RETURN d")
    assert [d["i"] for d in body["result"]] == list(range(7))
    assert body["extra"]["stats"]["scannedFull"] == 7
    _, body = await query(standin_client, "for d in docs filter d.even == true return d")
    assert [d["i"] for d in body["result"]] == [0, 2, 4, 6]
    _, body = await query(standin_client, "FOR d IN docs FILTER d.i == 1 RETURN d")
    assert [d["_key"] for d in body["result"]] == ["k1"]
    # AQL equality is typed: true is not 1
    _, body = await query(standin_client, "FOR d IN docs FILTER d.even == 1 RETURN d")
    assert body["result"] == []
    _, body = await query(
        standin_client,
        "FOR d IN @@c FILTER d.i == @i LIMIT 5 RETURN d",
        bindVars={"@c": "docs", "i": 3},
    )
    assert [d["i"] for d in body["result"]] == [3]
    _, body = await query(standin_client, "FOR d IN docs LIMIT 2 RETURN d")
    assert [d["i"] for d in body["result"]] == [0, 1]
    _, body = await query(standin_client, "FOR d IN docs LIMIT 5, 10 RETURN d")
    assert [d["i"] for d in body["result"]] == [5, 6]


async def test_insert_counts_writes(standin: StandIn, standin_client: Client, docs: str) -> None:
    status, body = await query(standin_client, 'INSERT {"_key": "q"} INTO docs')
    assert (status, body["result"], body["extra"]["stats"]["writesExecuted"]) == (201, [], 1)
    status, body = await query(
        standin_client, "INSERT @doc INTO docs", bindVars={"doc": {"_key": "q"}}
    )
    assert (status, body["errorNum"]) == (409, 1210)
    assert "conflicting key: q" in body["errorMessage"]
    assert standin.write_count("_system", "docs", "q") == 2
    assert (await standin_client.call("GET", "/_api/document/docs/q")).status == 200


async def test_cursor_batches(standin_client: Client, docs: str) -> None:
    status, first = await query(standin_client, "FOR d IN docs RETURN d", batchSize=3, count=True)
    assert status == 201
    assert list(first) == [
        "result",
        "hasMore",
        "id",
        "nextBatchId",
        "count",
        "extra",
        "cached",
        "error",
        "code",
    ]
    assert (first["hasMore"], first["nextBatchId"], first["count"]) == (True, "2", 7)
    cursor = first["id"]
    seen = [d["i"] for d in first["result"]]
    second = await standin_client.call("POST", f"/_api/cursor/{cursor}")
    assert second.status == 200
    assert (second.json["code"], second.json["id"], second.json["nextBatchId"]) == (
        200,
        cursor,
        "3",
    )
    assert "extra" not in second.json
    seen += [d["i"] for d in second.json["result"]]
    last = await standin_client.call("PUT", f"/_api/cursor/{cursor}")  # deprecated, still works
    assert last.status == 200
    assert last.json["hasMore"] is False
    assert "id" not in last.json
    assert "nextBatchId" not in last.json
    seen += [d["i"] for d in last.json["result"]]
    assert seen == list(range(7))
    gone = await standin_client.call("POST", f"/_api/cursor/{cursor}")
    assert (
        gone.body == b'{"code":404,"error":true,"errorMessage":"cursor not found","errorNum":1600}'
    )


async def test_cursor_batch_ids_and_retry(standin_client: Client, docs: str) -> None:
    _, first = await query(
        standin_client, "FOR d IN docs RETURN d", batchSize=4, options={"allowRetry": True}
    )
    cursor = first["id"]
    wrong = await standin_client.call("POST", f"/_api/cursor/{cursor}/5")
    assert wrong.status == 400
    second = await standin_client.call("POST", f"/_api/cursor/{cursor}/2")
    assert [d["i"] for d in second.json["result"]] == [4, 5, 6]
    again = await standin_client.call("POST", f"/_api/cursor/{cursor}/2")
    assert again.json == second.json
    deleted = await standin_client.call("DELETE", f"/_api/cursor/{cursor}")
    assert (deleted.status, deleted.body) == (
        202,
        f'{{"id":"{cursor}","error":false,"code":202}}'.encode(),
    )
    assert (await standin_client.call("DELETE", f"/_api/cursor/{cursor}")).json["errorNum"] == 1600


async def test_no_cursor_when_everything_fits(standin_client: Client, docs: str) -> None:
    _, body = await query(standin_client, "FOR d IN docs RETURN d", batchSize=7)
    assert (body["hasMore"], "id" in body, "nextBatchId" in body) == (False, False, False)
    missing = await standin_client.call("DELETE", "/_api/cursor")
    assert missing.status == 400
    assert (await standin_client.call("PATCH", "/_api/cursor/1")).status == 405


async def test_cursors_expire_after_their_ttl(standin_client: Client, docs: str) -> None:
    _, body = await query(standin_client, "FOR d IN docs RETURN d", batchSize=1, ttl=0.05)
    await asyncio.sleep(0.1)
    answer = await standin_client.call("POST", f"/_api/cursor/{body['id']}")
    assert answer.json["errorNum"] == 1600


async def test_async_query_result_is_a_live_cursor(standin_client: Client, docs: str) -> None:
    job_id = await standin_client.submit(
        "POST", "/_api/cursor", {"query": "FOR d IN docs RETURN d", "batchSize": 5}
    )
    answer = await standin_client.result(job_id)
    assert answer.status == 201
    assert answer.json["hasMore"] is True
    more = await standin_client.call("POST", f"/_api/cursor/{answer.json['id']}")
    assert [d["i"] for d in more.json["result"]] == [5, 6]
    # an invalid query is accepted; its error is the result
    bad = await standin_client.submit("POST", "/_api/cursor", {"query": "NOPE"})
    assert (await standin_client.result(bad)).json["errorNum"] == 1501


async def test_a_killed_sleep_never_swallows_a_cancel() -> None:
    """A restart cancels the stand-in's workers while a cancelled job's SLEEP wakes on
    its kill. Whatever the order of the two, the cancel must end the worker (with
    Python 3.11's wait_for it could be lost at one turn, and the restart then waited
    for that worker forever)."""
    store = Store(Ticks())
    for turns in range(8):
        killed = asyncio.Event()
        running = asyncio.create_task(Query("RETURN SLEEP(60)", {}).run(store, "_system", killed))
        await asyncio.sleep(0)  # asleep
        killed.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        if not running.cancel():
            continue  # it had ended already, killed: nothing to lose
        with pytest.raises(asyncio.CancelledError):
            await running

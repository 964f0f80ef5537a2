"""The stand-in's ordinary endpoints (spec §12.1-§12.4): version, databases,
collections and documents."""

from __future__ import annotations

import re

import pytest

from tests.standin import StandIn
from tests.standin.client import Client

JSON = "application/json; charset=utf-8"
REV = re.compile(r"_[-_A-Za-z0-9]{9,}")


@pytest.fixture
async def coll(standin_client: Client) -> str:
    answer = await standin_client.call("POST", "/_api/collection", {"name": "c"})
    assert answer.status == 200
    return "c"


async def test_version(standin_client: Client) -> None:
    answer = await standin_client.call("GET", "/_api/version")
    assert answer.body == b'{"server":"arango","license":"community","version":"3.12.4"}'
    assert answer.content_type == JSON
    for flag in ("true", "1"):
        details = (await standin_client.call("GET", f"/_api/version?details={flag}")).json
        assert details["details"]["role"] == "SINGLE"
        assert details["details"]["mode"] == "server"
    assert "details" not in (await standin_client.call("GET", "/_api/version?details=0")).json


async def test_databases(standin_client: Client) -> None:
    answer = await standin_client.call("POST", "/_api/database", {"name": "shop"})
    assert (answer.status, answer.json) == (201, {"error": False, "code": 201, "result": True})
    again = await standin_client.call("POST", "/_api/database", {"name": "shop"})
    assert (again.status, again.json["errorNum"]) == (409, 1207)
    bad = await standin_client.call("POST", "/_api/database", {"name": "a/b"})
    assert (bad.status, bad.json["errorNum"]) == (400, 1229)
    listing = await standin_client.call("GET", "/_api/database")
    assert listing.json == {"error": False, "code": 200, "result": ["_system", "shop"]}
    current = (await standin_client.call("GET", "/_db/shop/_api/database/current")).json
    assert current["result"]["name"] == "shop"
    assert current["result"]["isSystem"] is False
    # a database created later is reachable by its prefix, also percent-encoded
    await standin_client.call("POST", "/_api/database", {"name": "my db"})
    assert (await standin_client.call("GET", "/_db/my%20db/_api/version")).status == 200
    assert (await standin_client.call("GET", "/_db/shop/_api/database")).status == 403
    assert (await standin_client.call("DELETE", "/_api/database/shop")).status == 200
    assert (await standin_client.call("GET", "/_db/shop/_api/version")).status == 404


async def test_collections(standin_client: Client) -> None:
    answer = await standin_client.call("POST", "/_api/collection", {"name": "things", "type": 2})
    assert answer.status == 200
    body = answer.json
    assert list(body)[:4] == ["error", "code", "writeConcern", "waitForSync"]
    assert (body["error"], body["code"], body["name"], body["type"]) == (False, 200, "things", 2)
    assert body["id"].isdigit()
    assert body["keyOptions"] == {"allowUserKeys": True, "type": "traditional", "lastValue": 0}
    duplicate = await standin_client.call("POST", "/_api/collection", {"name": "things"})
    assert duplicate.json == {
        "code": 409,
        "error": True,
        "errorMessage": "duplicate name",
        "errorNum": 1207,
    }
    for name in ("1abc", "", "a b", None):
        illegal = await standin_client.call("POST", "/_api/collection", {"name": name})
        assert (illegal.status, illegal.json["errorNum"]) == (400, 1208)
    listing = (await standin_client.call("GET", "/_api/collection")).json
    assert (listing["error"], listing["code"]) == (False, 200)
    assert [c["name"] for c in listing["result"]] == ["things"]
    assert set(listing["result"][0]) == {
        "id",
        "name",
        "status",
        "type",
        "isSystem",
        "globallyUniqueId",
    }
    info = (await standin_client.call("GET", "/_api/collection/things")).json
    assert (info["name"], info["status"], info["code"]) == ("things", 3, 200)
    props = (await standin_client.call("GET", "/_api/collection/things/properties")).json
    assert props["waitForSync"] is False
    missing = await standin_client.call("GET", "/_api/collection/nope")
    assert (missing.status, missing.json["errorNum"]) == (404, 1203)


async def test_insert_statuses_headers_and_options(standin_client: Client, coll: str) -> None:
    answer = await standin_client.call("POST", f"/_api/document/{coll}", {"_key": "a", "v": 1})
    assert answer.status == 202
    assert list(answer.json) == ["_id", "_key", "_rev"]
    rev = answer.json["_rev"]
    assert REV.fullmatch(rev)
    assert answer.headers["etag"] == f'"{rev}"'
    assert answer.headers["location"] == f"/_db/_system/_api/document/{coll}/a"
    for flag in ("true", "1"):
        synced = await standin_client.call(
            "POST", f"/_api/document/{coll}?waitForSync={flag}", {"v": 2}
        )
        assert synced.status == 201
    new = await standin_client.call("POST", f"/_api/document/{coll}?returnNew=true", {"_key": "n"})
    assert new.json["new"] == {"_key": "n", "_id": f"{coll}/n", "_rev": new.json["_rev"]}
    silent = await standin_client.call("POST", f"/_api/document/{coll}?silent=true", {"x": 1})
    assert (silent.status, silent.body) == (202, b"{}")
    via_query = await standin_client.call("POST", f"/_api/document?collection={coll}", {"q": 1})
    assert via_query.status == 202


async def test_insert_errors(standin: StandIn, standin_client: Client, coll: str) -> None:
    await standin_client.call("POST", f"/_api/document/{coll}", {"_key": "dup"})
    conflict = await standin_client.call("POST", f"/_api/document/{coll}", {"_key": "dup"})
    assert conflict.status == 409
    assert conflict.body == (
        b'{"code":409,"error":true,"errorMessage":"unique constraint violated - in index '
        b'primary of type primary over \'_key\'; conflicting key: dup","errorNum":1210}'
    )
    assert standin.write_count("_system", coll, "dup") == 2
    missing = await standin_client.call("POST", "/_api/document/nope", {"a": 1})
    assert missing.json == {
        "code": 404,
        "error": True,
        "errorMessage": "collection or view not found: nope",
        "errorNum": 1203,
    }
    broken = await standin_client.call("POST", f"/_api/document/{coll}", b"{not json")
    assert (broken.status, broken.json["errorNum"]) == (400, 600)
    assert broken.content_type == JSON
    key = await standin_client.call("POST", f"/_api/document/{coll}", {"_key": "a/b"})
    assert (key.status, key.json["errorNum"]) == (400, 1221)
    assert standin.write_count("_system", coll, "a/b") == 0
    scalar = await standin_client.call("POST", f"/_api/document/{coll}", 5)
    assert (scalar.status, scalar.json["errorNum"]) == (400, 1227)


async def test_insert_many_reports_each_document(standin_client: Client, coll: str) -> None:
    answer = await standin_client.call(
        "POST", f"/_api/document/{coll}", [{"_key": "m"}, {"_key": "m"}, 3]
    )
    assert answer.status == 202
    first, second, third = answer.json
    assert first["_key"] == "m"
    assert (second["errorNum"], third["errorNum"]) == (1210, 1227)
    assert answer.headers["x-arango-error-codes"] == '{"1210":1,"1227":1}'


async def test_overwrite_modes(standin: StandIn, standin_client: Client, coll: str) -> None:
    path = f"/_api/document/{coll}"
    await standin_client.call("POST", path, {"_key": "o", "a": 1, "b": {"x": 1}})
    replaced = await standin_client.call("POST", f"{path}?overwrite=true", {"_key": "o", "a": 2})
    assert (replaced.status, "_oldRev" in replaced.json) == (202, True)
    await standin_client.call("POST", f"{path}?overwriteMode=update", {"_key": "o", "b": {"y": 2}})
    await standin_client.call("POST", f"{path}?overwriteMode=ignore", {"_key": "o", "a": 9})
    doc = (await standin_client.call("GET", f"{path}/o")).json
    assert (doc["a"], doc["b"]) == (2, {"y": 2})
    assert standin.write_count("_system", coll, "o") == 4


async def test_read_replace_update_delete(standin_client: Client, coll: str) -> None:
    path = f"/_api/document/{coll}"
    rev = (await standin_client.call("POST", path, {"_key": "d", "v": 1, "o": {"a": 1}})).json[
        "_rev"
    ]
    got = await standin_client.call("GET", f"{path}/d")
    assert got.json == {"_key": "d", "_id": f"{coll}/d", "_rev": rev, "v": 1, "o": {"a": 1}}
    assert got.headers["etag"] == f'"{rev}"'
    not_modified = await standin_client.call(
        "GET", f"{path}/d", headers={"if-none-match": f'"{rev}"'}
    )
    assert (not_modified.status, not_modified.body) == (304, b"")
    stale = await standin_client.call("GET", f"{path}/d", headers={"if-match": '"_other"'})
    assert (stale.status, stale.json["errorNum"], stale.json["_rev"]) == (412, 1200, rev)
    replaced = await standin_client.call("PUT", f"{path}/d", {"v": 2})
    assert (replaced.status, replaced.json["_oldRev"]) == (202, rev)
    updated = await standin_client.call("PATCH", f"{path}/d?waitForSync=true", {"o": {"b": 2}})
    assert updated.status == 201
    assert (await standin_client.call("GET", f"{path}/d")).json["o"] == {"b": 2}
    removed = await standin_client.call("DELETE", f"{path}/d")
    assert (removed.status, removed.json["_key"]) == (202, "d")
    gone = await standin_client.call("GET", f"{path}/d")
    assert (
        gone.body
        == b'{"code":404,"error":true,"errorMessage":"document not found","errorNum":1202}'
    )
    no_coll = await standin_client.call("GET", "/_api/document/nope/d")
    assert (no_coll.status, no_coll.json["errorNum"]) == (404, 1203)
    head = await standin_client.call("HEAD", f"{path}/d")
    assert (head.status, head.body) == (404, b"")

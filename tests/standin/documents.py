"""The ordinary endpoints a driver needs: version, databases, collections, documents.

Each handler takes a `Call` and returns a `Reply`; it runs the same way for a
synchronous request and for a queued async job. Bodies, statuses and key order
follow spec §12 and the generated examples of ArangoDB's documentation.
"""

from __future__ import annotations

import json
import platform
from typing import Any

from tests.standin.call import Call
from tests.standin.data import (
    COLLECTION_NAME,
    DATABASE_NAME,
    BadKey,
    Collection,
    Conflict,
    Database,
    Document,
    Store,
    merge,
)
from tests.standin.reply import (
    CORRUPTED_JSON,
    METHOD_NOT_ALLOWED,
    Reply,
    empty,
    handler_error,
    json_reply,
)

VERSION = "3.12.4"
SERVER_ID = "h1F2E3D4C5B6A"


def parse_json(call: Call) -> Any:
    """The body as JSON, or `CORRUPTED_JSON` (a `Reply`) when it is not."""
    try:
        return json.loads(call.body or b"null")
    except (ValueError, UnicodeDecodeError):
        return CORRUPTED_JSON


def collection_not_found(name: str) -> Reply:
    return handler_error(404, 1203, f"collection or view not found: {name}")


def document_meta(doc: Document) -> dict[str, Any]:
    return {"_id": doc["_id"], "_key": doc["_key"], "_rev": doc["_rev"]}


class DataApi:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _database(self, call: Call) -> Database:
        return self.store.databases[call.database]

    # -- /_api/version -------------------------------------------------------

    async def version(self, call: Call) -> Reply:
        if call.method not in ("GET", "HEAD", "PUT", "POST"):
            return METHOD_NOT_ALLOWED
        doc: dict[str, Any] = {"server": "arango", "license": "community", "version": VERSION}
        if call.flag("details"):
            doc["details"] = {
                "architecture": "64bit",
                "build-date": "2025-01-01 00:00:00",
                "host": SERVER_ID,
                "license": "community",
                "mode": "server",
                "platform": platform.system().lower(),
                "role": "SINGLE",
                "server-version": VERSION,
            }
        return json_reply(200, doc)

    # -- /_api/database ------------------------------------------------------

    async def database(self, call: Call) -> Reply:
        names = sorted(self.store.databases)
        if call.method == "GET" and call.suffixes == ["current"]:
            db = self._database(call)
            info = {"id": str(db.id), "name": db.name, "isSystem": db.name == "_system"}
            info["path"] = "none"
            return json_reply(200, {"error": False, "code": 200, "result": info})
        if call.database != "_system":
            return handler_error(403, 1230, "operation only allowed in system database")
        if call.method == "GET" and (not call.suffixes or call.suffixes == ["user"]):
            return json_reply(200, {"error": False, "code": 200, "result": names})
        if call.method == "POST" and not call.suffixes:
            body = parse_json(call)
            if isinstance(body, Reply):
                return body
            name = body.get("name") if isinstance(body, dict) else None
            if not isinstance(name, str) or not DATABASE_NAME.fullmatch(name):
                return handler_error(400, 1229, "database name invalid")
            if name in self.store.databases:
                return handler_error(409, 1207, "duplicate database name")
            self.store.create_database(name)
            return json_reply(201, {"error": False, "code": 201, "result": True})
        if call.method == "DELETE" and len(call.suffixes) == 1:
            name = call.suffix(0)
            if name == "_system":
                return handler_error(403, 1230, "operation only allowed in system database")
            if self.store.databases.pop(name, None) is None:
                return handler_error(404, 1228, "database not found")
            return json_reply(200, {"error": False, "code": 200, "result": True})
        return handler_error(400, 400, "bad parameter")

    # -- /_api/collection ----------------------------------------------------

    def _properties(self, collection: Collection) -> dict[str, Any]:
        return {
            "writeConcern": 1,
            "waitForSync": collection.wait_for_sync,
            "usesRevisionsAsDocumentIds": True,
            "syncByRevision": True,
            "statusString": "loaded",
            "id": str(collection.id),
            "isSmartChild": False,
            "schema": None,
            "name": collection.name,
            "type": collection.type,
            "status": 3,
            "cacheEnabled": False,
            "isSystem": collection.name.startswith("_"),
            "internalValidatorType": 0,
            "globallyUniqueId": f"{SERVER_ID}/{collection.id}",
            "keyOptions": {"allowUserKeys": True, "type": "traditional", "lastValue": 0},
            "computedValues": None,
            "objectId": str(collection.id - 1),
        }

    async def collection(self, call: Call) -> Reply:
        database = self._database(call)
        if not call.suffixes:
            if call.method == "POST":
                return self._create_collection(call, database)
            if call.method == "GET":
                listing = [c.describe() for c in database.collections.values()]
                return json_reply(200, {"error": False, "code": 200, "result": listing})
            return handler_error(
                400, 400, f"expected {call.method} /_api/collection/<collection-name>/<action>"
            )
        collection = database.collections.get(call.suffix(0))
        if collection is None:
            return collection_not_found(call.suffix(0))
        action = call.suffixes[1] if len(call.suffixes) > 1 else ""
        ok = {"error": False, "code": 200}
        if call.method == "GET" and action == "":
            return json_reply(200, {**ok, **collection.describe()})
        if call.method == "GET" and action == "properties":
            return json_reply(200, {**ok, **self._properties(collection)})
        if call.method == "GET" and action == "count":
            count = len(collection.documents)
            return json_reply(200, {**ok, **self._properties(collection), "count": count})
        if call.method == "PUT" and action == "truncate":
            collection.documents.clear()
            return json_reply(200, {**ok, **collection.describe()})
        if call.method == "DELETE" and action == "":
            del database.collections[collection.name]
            return json_reply(200, {**ok, "id": str(collection.id)})
        return handler_error(400, 400, "bad parameter")

    def _create_collection(self, call: Call, database: Database) -> Reply:
        body = parse_json(call)
        if isinstance(body, Reply):
            return body
        if not isinstance(body, dict):
            return handler_error(400, 1208, "illegal name")
        name = body.get("name")
        if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
            return handler_error(400, 1208, "illegal name")
        if name in database.collections:
            return handler_error(409, 1207, "duplicate name")
        self.store.ticks.next()  # the objectId
        type_ = 3 if body.get("type") == 3 else 2
        created = self.store.create_collection(
            database, name, type_, body.get("waitForSync") is True
        )
        return json_reply(200, {"error": False, "code": 200, **self._properties(created)})

    # -- /_api/document ------------------------------------------------------

    async def document(self, call: Call) -> Reply:
        database = self._database(call)
        if call.method == "POST":
            if len(call.suffixes) > 1:
                return handler_error(400, 601, "superfluous URL suffices")
            name = call.suffix(0) if call.suffixes else call.query.get("collection", "")
            if not name:
                return handler_error(400, 1204, "collection or view not found")
            collection = database.collections.get(name)
            if collection is None:
                return collection_not_found(name)
            return self._insert(call, collection)
        if call.method not in ("GET", "HEAD", "PUT", "PATCH", "DELETE"):
            return METHOD_NOT_ALLOWED
        if len(call.suffixes) != 2:
            return handler_error(400, 1203, "expecting GET /_api/document/<document-handle>")
        collection = database.collections.get(call.suffix(0))
        if collection is None:
            return collection_not_found(call.suffix(0))
        key = call.suffix(1)
        current = collection.documents.get(key)
        if current is None:
            return handler_error(404, 1202, "document not found")
        etag = (("etag", f'"{current["_rev"]}"'),)
        if_match = call.headers.get("if-match")
        if if_match is not None and if_match.strip('"') != current["_rev"]:
            return json_reply(
                412,
                {
                    "error": True,
                    "code": 412,
                    "errorNum": 1200,
                    "errorMessage": "conflict, _rev values do not match",
                    **document_meta(current),
                },
                etag,
            )
        if call.method in ("GET", "HEAD"):
            if call.headers.get("if-none-match", "").strip('"') == current["_rev"]:
                return empty(304)
            return json_reply(200, current, etag)
        if call.method == "DELETE":
            del collection.documents[key]
            meta = document_meta(current)
            return self._written(call, collection, meta, None, current)
        body = parse_json(call)
        if isinstance(body, Reply):
            return body
        if not isinstance(body, dict):
            return handler_error(400, 1227, "invalid document type")
        if call.method == "PATCH":
            body = merge(current, body, keep_null=call.flag("keepNull", default=True))
        new = self.store.store(collection, key, body)
        meta = {**document_meta(new), "_oldRev": current["_rev"]}
        return self._written(call, collection, meta, new, current)

    def _insert(self, call: Call, collection: Collection) -> Reply:
        body = parse_json(call)
        if isinstance(body, Reply):
            return body
        mode = call.query.get("overwriteMode") or (
            "replace" if call.flag("overwrite") else "conflict"
        )
        if isinstance(body, list):
            return self._insert_many(call, collection, body, mode)
        if not isinstance(body, dict):
            return handler_error(400, 1227, "invalid document type")
        try:
            new, old = self.store.insert(call.database, collection, body, mode)
        except Conflict as conflict:
            return handler_error(409, 1210, conflict.message)
        except BadKey:
            return handler_error(400, 1221, "illegal document key")
        meta = document_meta(new)
        if old is not None:
            meta["_oldRev"] = old["_rev"]
        return self._written(call, collection, meta, new, old)

    def _insert_many(self, call: Call, collection: Collection, docs: list[Any], mode: str) -> Reply:
        results: list[dict[str, Any]] = []
        errors: dict[str, int] = {}
        for doc in docs:
            try:
                if not isinstance(doc, dict):
                    raise TypeError
                new, _ = self.store.insert(call.database, collection, doc, mode)
                results.append(document_meta(new))
                continue
            except Conflict as conflict:
                num, message = 1210, conflict.message
            except BadKey:
                num, message = 1221, "illegal document key"
            except TypeError:
                num, message = 1227, "invalid document type"
            errors[str(num)] = errors.get(str(num), 0) + 1
            results.append({"error": True, "errorNum": num, "errorMessage": message})
        status = 201 if call.flag("waitForSync") or collection.wait_for_sync else 202
        headers = (("x-arango-error-codes", json.dumps(errors, separators=(",", ":"))),)
        return json_reply(status, results, headers if errors else ())

    def _written(
        self,
        call: Call,
        collection: Collection,
        meta: dict[str, Any],
        new: Document | None,
        old: Document | None,
    ) -> Reply:
        status = 201 if call.flag("waitForSync") or collection.wait_for_sync else 202
        headers = (
            ("etag", f'"{meta["_rev"]}"'),
            ("location", f"/_db/{call.database}/_api/document/{meta['_id']}"),
        )
        if call.flag("silent"):
            return json_reply(status, {}, headers)
        doc = dict(meta)
        if call.flag("returnNew") and new is not None:
            doc["new"] = new
        if call.flag("returnOld") and old is not None:
            doc["old"] = old
        return json_reply(status, doc, headers)

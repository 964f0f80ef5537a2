"""A tiny AQL: just the queries the tests send, parsed with regular expressions.

    RETURN SLEEP(<number|@var>)           sleeps, stops early when killed (410/1500)
    RETURN <JSON literal|@var>
    FOR v IN <coll|@@var> [FILTER v.<attr> == <literal|@var>] [LIMIT [o,] n] RETURN v
    INSERT <JSON object|@var> INTO <coll|@@var>       counts as a write

Anything else is a 400/1501 syntax error, as ArangoDB's parser would answer.
Keywords are case-insensitive, as in AQL.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from tests.standin.data import BadKey, Conflict, Store

_FLAGS = re.IGNORECASE | re.DOTALL
_NAME = r"(?:@@[A-Za-z_]\w*|[A-Za-z_][\w-]*)"
SLEEP = re.compile(r"RETURN\s+SLEEP\s*\(\s*(?P<arg>.*?)\s*\)", _FLAGS)
RETURN = re.compile(r"RETURN\s+(?P<expr>.+)", _FLAGS)
FOR = re.compile(
    rf"FOR\s+(?P<var>[A-Za-z_]\w*)\s+IN\s+(?P<coll>{_NAME})"
    r"(?:\s+FILTER\s+(?P<fvar>[A-Za-z_]\w*)\.(?P<attr>[A-Za-z_]\w*)\s*==\s*(?P<value>.+?))?"
    r"(?:\s+LIMIT\s+(?:(?P<offset>\d+)\s*,\s*)?(?P<limit>\d+))?"
    r"\s+RETURN\s+(?P<rvar>[A-Za-z_]\w*)",
    _FLAGS,
)
INSERT = re.compile(rf"INSERT\s+(?P<doc>.+?)\s+INTO\s+(?P<coll>{_NAME})", _FLAGS)


class AqlError(Exception):
    def __init__(self, status: int, error_num: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_num = error_num
        self.message = message


@dataclass
class Outcome:
    result: list[Any]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    writes: int = 0
    scanned: int = 0
    filtered: int = 0
    started: float = field(default_factory=time.monotonic)

    def stats(self) -> dict[str, Any]:
        return {
            "writesExecuted": self.writes,
            "writesIgnored": 0,
            "scannedFull": self.scanned,
            "scannedIndex": 0,
            "cursorsCreated": 0,
            "cursorsRearmed": 0,
            "cacheHits": 0,
            "cacheMisses": 0,
            "filtered": self.filtered,
            "httpRequests": 0,
            "executionTime": time.monotonic() - self.started,
            "peakMemoryUsage": 0,
            "intermediateCommits": 0,
        }


def syntax_error(query: str) -> AqlError:
    near = query.strip()[:30]
    return AqlError(
        400,
        1501,
        f"syntax error, unexpected input near '{near}' at position 1:1 (while parsing)",
    )


def equal(left: Any, right: Any) -> bool:
    """AQL `==`: values of different types are never equal (true != 1)."""

    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "bool"
        return "number" if isinstance(value, int | float) else type(value).__name__

    return kind(left) == kind(right) and bool(left == right)


class Query:
    """One query with its bind parameters; `run` executes it against a database."""

    def __init__(self, text: str, bind_vars: dict[str, Any]) -> None:
        self.text = text.strip()
        self.bind_vars = bind_vars
        self.used: set[str] = set()

    def _value(self, expr: str) -> Any:
        expr = expr.strip()
        if expr.startswith("@") and re.fullmatch(r"@[A-Za-z_]\w*", expr):
            name = expr[1:]
            self.used.add(name)
            if name not in self.bind_vars:
                raise AqlError(
                    400,
                    1551,
                    f"no value specified for declared bind parameter '{name}' (while parsing)",
                )
            return self.bind_vars[name]
        try:
            return json.loads(expr)
        except ValueError:
            raise syntax_error(self.text) from None

    def _collection(self, name: str) -> str:
        if not name.startswith("@@"):
            return name
        param = name[1:]  # a collection bind parameter is named "@coll" in bindVars
        self.used.add(param)
        if param not in self.bind_vars:
            message = f"no value specified for declared bind parameter '{param}' (while parsing)"
            raise AqlError(400, 1551, message)
        bound = self.bind_vars[param]
        if not isinstance(bound, str):
            raise AqlError(400, 1553, f"bind parameter '{param}' has an invalid value or type")
        return bound

    def _check_unused(self) -> None:
        for name in self.bind_vars:
            if name not in self.used:
                raise AqlError(400, 1552, f"bind parameter '{name}' was not declared in the query")

    async def run(self, store: Store, database: str, killed: asyncio.Event) -> Outcome:
        if match := SLEEP.fullmatch(self.text):
            seconds = self._value(match["arg"])
            self._check_unused()
            return await self._sleep(seconds, killed)
        if match := FOR.fullmatch(self.text):
            return self._scan(match, store, database)
        if match := INSERT.fullmatch(self.text):
            return self._insert(match, store, database)
        if match := RETURN.fullmatch(self.text):
            value = self._value(match["expr"])
            self._check_unused()
            return Outcome([value])
        raise syntax_error(self.text)

    async def _sleep(self, seconds: Any, killed: asyncio.Event) -> Outcome:
        outcome = Outcome([None])
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            outcome.warnings.append(
                {"code": 1542, "message": "invalid argument type in call to function 'SLEEP()'"}
            )
            return outcome
        # (asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result
        # when a cancel of its task meets the kill, and the cancel is lost)
        try:
            async with asyncio.timeout(max(float(seconds), 0.0)):
                await killed.wait()
        except TimeoutError:
            return outcome
        raise AqlError(410, 1500, "query killed")

    def _scan(self, match: re.Match[str], store: Store, database: str) -> Outcome:
        var = match["var"]
        if match["rvar"] != var or (match["fvar"] is not None and match["fvar"] != var):
            raise syntax_error(self.text)
        wanted = self._value(match["value"]) if match["value"] is not None else None
        name = self._collection(match["coll"])
        self._check_unused()
        collection = store.databases[database].collections.get(name)
        if collection is None:
            raise AqlError(404, 1203, f"AQL: collection or view not found: {name} (while parsing)")
        outcome = Outcome([])
        for doc in collection.documents.values():
            outcome.scanned += 1
            if match["attr"] is not None and not equal(doc.get(match["attr"]), wanted):
                outcome.filtered += 1
                continue
            outcome.result.append(doc)
        if match["limit"] is not None:
            start = int(match["offset"] or 0)
            outcome.result = outcome.result[start : start + int(match["limit"])]
        return outcome

    def _insert(self, match: re.Match[str], store: Store, database: str) -> Outcome:
        doc = self._value(match["doc"])
        name = self._collection(match["coll"])
        self._check_unused()
        collection = store.databases[database].collections.get(name)
        if collection is None:
            raise AqlError(404, 1203, f"AQL: collection or view not found: {name} (while parsing)")
        if not isinstance(doc, dict):
            raise AqlError(400, 1227, "AQL: invalid document type (while executing)")
        try:
            store.insert(database, collection, doc)
        except Conflict as conflict:
            raise AqlError(409, 1210, f"AQL: {conflict.message} (while executing)") from None
        except BadKey:
            raise AqlError(400, 1221, "AQL: illegal document key (while executing)") from None
        return Outcome([], writes=1)

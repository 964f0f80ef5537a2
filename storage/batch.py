"""A batch of writes in one SQLite transaction, on the writer's thread
(`transaction`; the writer, storage.writer, makes the batches), and the records
a write is made of (`Statement`, `Want`, `Write`).

Inside a batch, consecutive writes with the same SQL that need no result share
statements: a multi-row INSERT (up to MAX_ROWS rows) for a statement that names
its ``values`` group, else one ``executemany``. Commands (``Want.OUTCOME``, see
storage.sql) share them the same way, and the outcomes of all the commands of a
batch are read in one statement; other writes that need a rowcount or RETURNING
rows run one by one.

Why multi-row INSERTs: SQLite's module releases Python's interpreter lock for
every step of a statement, and an ``executemany`` steps once per row. On a busy
proxy the event loop's thread takes the lock at each of those releases, and the
writer's thread then waits to get it back, often for a millisecond or more (the
cores are shared with everything else): a batch of a hundred accepts took tens
to hundreds of milliseconds that way, for about a hundred microseconds of
SQLite's own work. One statement for the batch's accepts is one such wait, and
so is one for its results stored (commands), where one per job was two waits.

A multi-row statement has 1, 2, 4, ... or MAX_ROWS rows, the last ones all NULL
(which every such statement ignores): seven texts per statement for SQLite's
statement cache, not one per row count. A cached statement keeps the values it was
last run with until its next run; one that was given more than RELEASE_BYTES runs
once more right away with NULLs only, to let them go: the writer's cached
statements never hold more than a few MiB of jobs and results.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, cast

from storage.records import frozen

MAX_ROWS = 64  # rows of one multi-row statement
RELEASE_BYTES = 64 * 1024  # values a cached statement may keep until its next run
_TEXTS = (bytes, str)  # the values that count towards it (the store binds exact ones)

# Where commands record their outcome (Want.OUTCOME), on the writer's connection only.
OUTCOME_TABLE = "CREATE TEMP TABLE outcome (k INTEGER NOT NULL, a ANY, b ANY, c ANY)"
# One row for the whole batch, in JSON: each outcome as [k, a, b, c, blobs]. NULL,
# integers and text are themselves (exact: SQLite writes integers in full, and the
# store's text is valid UTF-8); JSON holds no blob, so a blob is its hex, and `blobs`
# has bit n set when value n is one (no JSON subtypes: their rules vary by version);
# a real would be rounded, and is refused on reading.
OUTCOMES = (
    "SELECT json_group_array(json_array(k,"
    " CASE typeof(a) WHEN 'blob' THEN hex(a) ELSE a END,"
    " CASE typeof(b) WHEN 'blob' THEN hex(b) ELSE b END,"
    " CASE typeof(c) WHEN 'blob' THEN hex(c) ELSE c END,"
    " (typeof(a) = 'blob') + 2 * (typeof(b) = 'blob') + 4 * (typeof(c) = 'blob')"
    ")) FROM outcome"
)
CLEAR_OUTCOMES = "DELETE FROM outcome"

Params = Sequence[Any] | Mapping[str, Any]
Result = int | list[Any] | None
OnCommit = Callable[[Result], None]
OnAbort = Callable[[], None]
OnDurable = Callable[[], None]


class Want(Enum):
    NOTHING = "nothing"  # result None; consecutive ones with the same SQL share statements
    ROWCOUNT = "rowcount"  # result: total rows changed by the write's statements
    ROWS = "rows"  # result: rows returned by the write's statements (RETURNING)
    ROWS_EACH = "rows each"  # result: those rows, a list for each statement
    # A command (storage.sql): one INSERT, with a values group, into a view whose trigger
    # records rows in OUTCOME_TABLE under k, the INSERT's first parameter, which the
    # writer binds (params are the rest). Result: those rows, as (a, b, c) tuples.
    OUTCOME = "outcome"


@frozen
class Statement:
    sql: str
    params: Params = ()
    # Of an INSERT with positional parameters, whose `sql` holds its one VALUES row
    # once, as this text: consecutive writes of it run as one statement of many rows.
    # A row whose values are all NULL must do nothing (the rows that fill it up).
    values: str | None = None

    def __post_init__(self) -> None:
        # (per statement made, several per job: the sql checked once, no ABC isinstance)
        if self.values is not None and (
            type(self.params) is not tuple or not _one_values_group(self.sql, self.values)
        ):
            raise ValueError("a values group is in its sql once, its parameters a positional tuple")


@functools.cache
def _one_values_group(sql: str, values: str) -> bool:
    return sql.count(values) == 1


@frozen(eq=False)
class Write:
    statements: tuple[Statement, ...]
    want: Want
    future: asyncio.Future[Result]
    on_commit: OnCommit | None
    on_abort: OnAbort | None
    scrubs: bool = False
    on_durable: OnDurable | None = None

    def batchable_with(self, other: Write) -> bool:
        return (
            self.want is other.want
            and self.want in (Want.NOTHING, Want.OUTCOME)
            and len(self.statements) == len(other.statements) == 1
            and self.statements[0].sql == other.statements[0].sql
        )


def transaction(conn: sqlite3.Connection, writes: list[Write]) -> list[Result]:
    """BEGIN, every write, COMMIT; on any error ROLLBACK and raise. In SQLite's thread."""
    first = writes[0]
    if len(writes) == 1 and len(first.statements) == 1 and first.want is not Want.OUTCOME:
        # A lone statement is its own transaction in autocommit mode.
        return _run(conn, writes, 0)
    conn.execute("BEGIN IMMEDIATE")
    try:
        results: list[Result] = []
        start = 0
        while start < len(writes):
            end = start + 1
            while end < len(writes) and writes[start].batchable_with(writes[end]):
                end += 1
            results.extend(_run(conn, writes[start:end], start))
            start = end
        if any(write.want is Want.OUTCOME for write in writes):
            _collect_outcomes(conn, writes, results)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (e.g. on SQLITE_FULL): then this is a no-op.
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        raise
    return results


def _run(conn: sqlite3.Connection, writes: list[Write], first: int) -> list[Result]:
    """One write, or consecutive ones joined by `batchable_with`; `first`: the number in
    its batch of the first (a command's k). A command's result comes later (its
    outcome, `_collect_outcomes`)."""
    statements = writes[0].statements
    if len(statements) == 1 and statements[0].values is not None:
        _execute_rows(conn, writes, first)
    elif len(writes) > 1:  # (all of one statement: batchable_with)
        conn.executemany(statements[0].sql, [write.statements[0].params for write in writes])
    else:
        return [_execute_one(conn, writes[0])]
    return [None] * len(writes)


def _execute_rows(conn: sqlite3.Connection, writes: list[Write], first: int) -> None:
    """Writes of one statement with a values group, as statements of many rows (see
    above)."""
    statement = writes[0].statements[0]
    assert statement.values is not None
    command = writes[0].want is Want.OUTCOME
    width = statement.values.count("?")
    for start in range(0, len(writes), MAX_ROWS):
        chunk = writes[start : start + MAX_ROWS]
        rows = 1 << (len(chunk) - 1).bit_length()  # 1, 2, 4, ... MAX_ROWS
        params: list[Any] = []
        for k, write in enumerate(chunk, first + start):
            if command:
                params.append(k)
            params.extend(cast(Sequence[Any], write.statements[0].params))
        params.extend([None] * (width * rows - len(params)))
        sql = _multi_row(statement.sql, statement.values, rows)
        conn.execute(sql, params)
        if _text_bytes(params) > RELEASE_BYTES:
            conn.execute(sql, [None] * len(params))


def _text_bytes(params: list[Any]) -> int:
    """The length of the texts and blobs in `params`. (A plain loop: three times
    faster than sum() over a generator with isinstance, with the lock held.)"""
    total = 0
    for value in params:
        if type(value) in _TEXTS:
            total += len(value)
    return total


def _collect_outcomes(conn: sqlite3.Connection, writes: list[Write], results: list[Result]) -> None:
    """Each command's result: the rows its trigger recorded, read in one statement."""
    [(found,)] = conn.execute(OUTCOMES).fetchall()
    conn.execute(CLEAR_OUTCOMES)
    for k, write in enumerate(writes):
        if write.want is Want.OUTCOME:
            results[k] = []
    for k, a, b, c, blobs in json.loads(found):
        values = (a, b, c)
        if blobs or float in (type(a), type(b), type(c)):
            values = _decoded(values, blobs)
        cast(list[Any], results[k]).append(values)


def _decoded(values: tuple[Any, ...], blobs: int) -> tuple[Any, ...]:
    """An outcome's values read from OUTCOMES with its blobs (bits of `blobs`) as bytes."""
    decoded = []
    for n, value in enumerate(values):
        if blobs >> n & 1:
            decoded.append(bytes.fromhex(value))
        elif type(value) is float:
            raise ValueError("an outcome cannot hold a real exactly")  # JSON rounds it
        else:
            decoded.append(value)
    return tuple(decoded)


@functools.lru_cache(maxsize=64)
def _multi_row(sql: str, values: str, rows: int) -> str:
    """`sql` with its `values` group `rows` times."""
    return sql.replace(values, ", ".join([values] * rows))


def _execute_one(conn: sqlite3.Connection, write: Write) -> Result:
    count = 0
    rows: list[Any] = []
    for statement in write.statements:
        cursor = conn.execute(statement.sql, statement.params)
        if write.want is Want.ROWS:
            rows.extend(cursor.fetchall())
        elif write.want is Want.ROWS_EACH:
            rows.append(cursor.fetchall())
        else:
            count += cursor.rowcount
    if write.want in (Want.ROWS, Want.ROWS_EACH):
        return rows
    return count if write.want is Want.ROWCOUNT else None

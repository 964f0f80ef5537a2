"""The database schema, its migrations, and the checks that the file is ours.

A database is recognised by ``PRAGMA application_id`` (set with the first schema)
and versioned by ``PRAGMA user_version``. ``MIGRATIONS[n]`` takes version ``n`` to
``n + 1`` in one transaction together with the new ``user_version``, so a crash
mid-migration leaves the old version intact.

    version 1   the jobs table, its state index, the forgotten-job trigger
    version 2   rsize (bytes of a stored result) and a partial index on the finish
                time of done jobs, for retention; rsize is filled in for stored results
    version 3   cancelled (its owner asked ArangoDB to cancel it): a job ArangoDB then
                loses is not run again

What ``prepare`` does with the file it finds::

    empty file (no tables, ids 0)           -> create the newest schema
    application_id ours, 1 <= version < N   -> migrate up to N
    application_id ours, version == N       -> use it
    application_id ours, version > N        -> StoreError (written by a newer proxy)
    any other SQLite database               -> StoreError (not ours; never touched)
    not an SQLite database                  -> StoreError
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite

from storage.errors import StoreError

APPLICATION_ID = 0x41415058  # "AAPX": arango-async-proxy
WAL_SIZE_LIMIT = 64 * 1024 * 1024

SCHEMA_V1 = (
    """
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused
        mode        TEXT    NOT NULL CHECK (mode IN ('store', 'true')),
        state       TEXT    NOT NULL CHECK (state IN ('accepted', 'submitted', 'done')),
        user        TEXT    NOT NULL,
        database    TEXT    NOT NULL,
        method      TEXT    NOT NULL,
        target      TEXT    NOT NULL,
        headers     TEXT,             -- JSON [[name, value], ...]; NULL once done
        auth        TEXT,             -- Authorization header; NULL once done
        body        BLOB,             -- request body; NULL once done
        created     REAL    NOT NULL, -- epoch seconds
        upstream_id TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        finished    REAL,             -- epoch seconds, once done
        status      INTEGER,          -- the result, once done
        rheaders    TEXT,             -- JSON [[name, value], ...]
        rbody       BLOB
    )
    """,
    "CREATE INDEX jobs_state ON jobs (state, id)",
    # Forgotten jobs have no one to fetch their result: finishing one deletes it,
    # which keeps finish() a single UPDATE whatever the job's mode.
    """
    CREATE TRIGGER jobs_forgotten_done AFTER UPDATE OF state ON jobs
    WHEN NEW.state = 'done' AND NEW.mode = 'true'
    BEGIN
        DELETE FROM jobs WHERE id = NEW.id;
    END
    """,
    f"PRAGMA application_id = {APPLICATION_ID}",
)


# Retention (result_ttl, max_result_bytes) walks done jobs oldest-finished first and
# needs their sizes without reading any result: the index covers (finished, id,
# rsize) and holds done jobs only, so accepts and submits never touch it.
SCHEMA_V2 = (
    "ALTER TABLE jobs ADD COLUMN rsize INTEGER",  # bytes of rheaders + rbody, once done
    "UPDATE jobs SET rsize = coalesce(length(CAST(rheaders AS BLOB)), 0)"
    " + coalesce(length(CAST(rbody AS BLOB)), 0) WHERE state = 'done'",
    "CREATE INDEX jobs_done_finished ON jobs (finished, id, rsize) WHERE state = 'done'",
)


# A cancel sent to ArangoDB is recorded: if ArangoDB then loses the job (restarts
# before its 410 is fetched), it must not be sent again, whatever lost_job_policy says.
SCHEMA_V3 = ("ALTER TABLE jobs ADD COLUMN cancelled INTEGER NOT NULL DEFAULT 0",)


Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


def _running(statements: tuple[str, ...]) -> Migration:
    async def migration(db: aiosqlite.Connection) -> None:
        for statement in statements:
            await db.execute(statement)

    return migration


MIGRATIONS: tuple[Migration, ...] = tuple(map(_running, (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3)))
LATEST = len(MIGRATIONS)


async def _one(db: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await db.execute_fetchall(sql))
    return rows[0][0]


async def prepare(db: aiosqlite.Connection, path: Path, synchronous: str) -> None:
    """Check that `path` is our database, switch it to WAL, and migrate it to LATEST.

    Nothing is written before the checks pass, so a foreign file is left as it was.
    """
    application_id = await _one(db, "PRAGMA application_id")
    version = await _one(db, "PRAGMA user_version")
    objects = await _one(db, "SELECT count(*) FROM sqlite_master")
    fresh = (application_id, version, objects) == (0, 0, 0)
    if not fresh and (application_id != APPLICATION_ID or version == 0):
        raise StoreError(
            f"{path} is an SQLite database that is not an arango-async-proxy job store; "
            "refusing to use it (move it away or choose another data folder)"
        )
    if version > LATEST:
        raise StoreError(
            f"{path} has job store schema version {version}, newer than this proxy "
            f"understands ({LATEST}); run a newer proxy on it"
        )
    mode = await _one(db, "PRAGMA journal_mode = WAL")
    if mode != "wal":
        raise StoreError(f"{path}: cannot switch to WAL mode (the file system refused: {mode})")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    # After a burst of large bodies, give the WAL file's disk space back at checkpoints.
    await db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    # Wiped credentials and fetched results must not linger in free pages.
    await db.execute("PRAGMA secure_delete = ON")
    await migrate(db, version)


async def migrate(db: aiosqlite.Connection, version: int) -> None:
    for target in range(version + 1, LATEST + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            await MIGRATIONS[target - 1](db)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.rollback()
            raise

"""The store's files: permissions, the folder lock, refusing files that are not ours, migrations."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest

from storage import JobState, JobStore, StoredResponse, StoreError, schema, writer
from storage.folder import DataFolder
from tests.test_store import RESULT, new_job


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    # A umask that even strips owner bits: the modes must not depend on it.
    old = os.umask(0o277)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("strict_umask")
async def test_folder_is_created_0700_and_files_are_0600(tmp_path: Path) -> None:
    data = tmp_path / "a" / "data"
    store = await JobStore.open(data)
    try:
        await store.accept(new_job())
        assert mode(data) == 0o700
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            assert mode(data / name) == 0o600, name
    finally:
        await store.close()


async def test_under_umask_000_no_folder_made_is_writable_by_others(tmp_path: Path) -> None:
    """Parents made along the way were 0777 under umask 000: anyone could swap the
    data folder for their own."""
    old = os.umask(0)
    try:
        store = await JobStore.open(tmp_path / "x" / "y" / "data")
        await store.accept(new_job())
        await store.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "x") == mode(tmp_path / "x" / "y") == 0o755
    assert mode(tmp_path / "x" / "y" / "data") == 0o700
    assert mode(tmp_path / "x" / "y" / "data" / "jobs.sqlite3") == 0o600


async def test_loose_wal_and_shm_files_a_crash_left_are_tightened(tmp_path: Path) -> None:
    """SQLite fixes the mode of an empty -wal or -shm itself, not of one with frames."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    crashed.mkdir(mode=0o700)
    store = await JobStore.open(live)
    try:
        await store.accept(new_job())
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            # the files as a store killed now leaves them, then loosened by someone
            shutil.copyfile(live / name, crashed / name)
            os.chmod(crashed / name, 0o644)
    finally:
        await store.close()
    assert (crashed / "jobs.sqlite3-wal").stat().st_size > 0
    store = await JobStore.open(crashed)
    try:
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            assert mode(crashed / name) == 0o600, name
        assert await store.list_ids(done=False, viewer=None, limit=10) == [1]  # from the -wal
    finally:
        await store.close()


async def test_an_existing_folder_keeps_its_mode_and_a_loose_file_is_tightened(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    os.chmod(data, 0o750)
    store = await JobStore.open(data)
    await store.close()
    os.chmod(data / "jobs.sqlite3", 0o644)
    store = await JobStore.open(data)
    await store.close()
    assert mode(data) == 0o750
    assert mode(data / "jobs.sqlite3") == 0o600


@pytest.mark.parametrize("loose", [0o770, 0o707, 0o1777, 0o720, 0o702])
async def test_a_folder_others_can_write_is_refused(tmp_path: Path, loose: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, loose)
    with pytest.raises(StoreError, match=r"writable by group or others \(mode 0?\d+\); make it"):
        await JobStore.open(data)
    assert mode(data) == loose  # not changed behind the operator's back
    assert not (data / "jobs.sqlite3").exists()
    os.chmod(data, 0o750)  # readable by the group is the operator's choice
    store = await JobStore.open(data)  # the refused open left no lock behind
    await store.close()


async def test_an_empty_existing_file_becomes_a_store(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").touch()
    store = await JobStore.open(tmp_path)
    assert await store.accept(new_job()) == 1
    await store.close()


async def test_a_folder_holds_one_store_at_a_time(tmp_path: Path) -> None:
    store = await JobStore.open(tmp_path)
    with pytest.raises(StoreError, match="in use by another job store"):
        await JobStore.open(tmp_path)
    await store.close()
    store = await JobStore.open(tmp_path)  # the lock went with close()
    await store.close()


async def test_a_data_path_that_is_a_file_or_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot open the data folder"):
        await JobStore.open(tmp_path / "file")
    with pytest.raises(StoreError, match="cannot create the data folder"):
        await JobStore.open(tmp_path / "file" / "data")


async def test_a_database_path_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").mkdir()
    with pytest.raises(StoreError, match=r"jobs\.sqlite3 is not a regular file"):
        await JobStore.open(tmp_path)
    # the failed open released the folder
    os.rmdir(tmp_path / "jobs.sqlite3")
    store = await JobStore.open(tmp_path)
    await store.close()


async def test_a_garbage_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    garbage = b"this is not a database\n" * 300
    (tmp_path / "jobs.sqlite3").write_bytes(garbage)
    with pytest.raises(StoreError, match="not a database"):
        await JobStore.open(tmp_path)
    assert (tmp_path / "jobs.sqlite3").read_bytes() == garbage


def make_db(path: Path, *statements: str) -> bytes:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
    db.close()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        (["CREATE TABLE jobs (id INTEGER PRIMARY KEY)"], "not an arango-async-proxy job store"),
        (["PRAGMA user_version = 1"], "not an arango-async-proxy job store"),
        ([f"PRAGMA application_id = {schema.APPLICATION_ID}"], "not an arango-async-proxy"),
        (
            [f"PRAGMA application_id = {schema.APPLICATION_ID}", "PRAGMA user_version = 99"],
            "schema version 99, newer than this proxy understands",
        ),
    ],
)
async def test_a_foreign_or_newer_sqlite_database_is_refused_and_left_alone(
    tmp_path: Path, statements: list[str], message: str
) -> None:
    before = make_db(tmp_path / "jobs.sqlite3", *statements)
    with pytest.raises(StoreError, match=message):
        await JobStore.open(tmp_path)
    assert (tmp_path / "jobs.sqlite3").read_bytes() == before  # not even switched to WAL


async def _add_note_column(db: aiosqlite.Connection) -> None:
    await db.execute("ALTER TABLE jobs ADD COLUMN note TEXT")


async def _broken_migration(db: aiosqlite.Connection) -> None:
    await db.execute("ALTER TABLE jobs ADD COLUMN note TEXT")
    await db.execute("ALTER TABLE no_such_table ADD COLUMN x")


async def test_migrations_run_in_order_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await JobStore.open(tmp_path)
    job_id = await store.accept(new_job())
    await store.close()

    latest = schema.LATEST
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, _add_note_column))
    monkeypatch.setattr(schema, "LATEST", latest + 1)
    store = await JobStore.open(tmp_path)
    assert await store.state(job_id, None) is not None
    db = store._writer
    assert list(await db.execute_fetchall("PRAGMA user_version")) == [(latest + 1,)]
    columns = [row[1] for row in await db.execute_fetchall("PRAGMA table_info(jobs)")]
    assert columns[-1] == "note"
    await store.close()


async def test_a_failed_migration_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await JobStore.open(tmp_path)
    job_id = await store.accept(new_job())
    await store.close()

    latest = schema.LATEST
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, _broken_migration))
        patch.setattr(schema, "LATEST", latest + 1)
        with pytest.raises(StoreError, match="no such table"):
            await JobStore.open(tmp_path)

    store = await JobStore.open(tmp_path)
    db = store._writer
    assert list(await db.execute_fetchall("PRAGMA user_version")) == [(latest,)]
    columns = [row[1] for row in await db.execute_fetchall("PRAGMA table_info(jobs)")]
    assert "note" not in columns
    assert await store.finish(job_id, RESULT)
    await store.close()


async def test_a_dangling_symlink_for_the_database(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match=r"cannot prepare .*jobs\.sqlite3"):
        await JobStore.open(tmp_path)
    (tmp_path / "jobs.sqlite3").unlink()
    store = await JobStore.open(tmp_path)  # the failed open released the folder
    await store.close()


async def test_the_last_id_is_2_63_minus_1(tmp_path: Path) -> None:
    store = await JobStore.open(tmp_path)
    await store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "INSERT INTO jobs (id, mode, state, user, database, method, target, created)"
            " VALUES (?, 'store', 'accepted', 'u', 'd', 'GET', '/', 0)",
            (2**63 - 1,),
        )
    db.close()
    store = await JobStore.open(tmp_path)
    try:
        with pytest.raises(StoreError, match="used up all"):
            await store.accept(new_job())
        assert store.unfinished == 1
    finally:
        await store.close()


async def test_release_of_the_folder_is_idempotent(tmp_path: Path) -> None:
    folder = DataFolder.claim(tmp_path)
    folder.release()
    folder.release()
    DataFolder.claim(tmp_path).release()


DATABASE_FILES = ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm")


def stored_bytes(data: Path) -> bytes:
    """Everything the store's files hold, as anyone who can read them would see it."""
    return b"".join((data / name).read_bytes() for name in DATABASE_FILES if (data / name).exists())


async def wait_for_checkpoint(store: JobStore, after: int) -> None:
    deadline = time.monotonic() + 10
    while store.checkpoints <= after:
        assert time.monotonic() < deadline, "no scrubbing checkpoint"
        await asyncio.sleep(0.01)


async def test_wiped_credentials_and_results_leave_the_wal_too(tmp_path: Path) -> None:
    # Distinct markers, so a hit can only come from these jobs.
    secrets = [f"Basic c2VjcmV0LW1hcmtlci0{n}=" for n in range(3)]
    result = StoredResponse(200, (), b"result-marker-" + b"x" * 5000)  # spills to overflow
    store = await JobStore.open(tmp_path)
    try:
        ids = [await store.accept(new_job(auth=secret)) for secret in secrets]
        seen = stored_bytes(tmp_path)
        assert all(secret.encode() in seen for secret in secrets)
        await store.mark_submitted(ids[0], "u1")
        await store.finish(ids[0], result)  # harvested
        await store.finish(ids[1], RESULT, from_states=(JobState.ACCEPTED,))  # cancelled
        assert await store.delete(ids[2], "alice")  # forgotten: runs on, keeps its auth
        checkpoints = store.checkpoints
        await wait_for_checkpoint(store, checkpoints)
        seen = stored_bytes(tmp_path)
        assert secrets[0].encode() not in seen
        assert secrets[1].encode() not in seen
        assert secrets[2].encode() in seen  # still needed to talk to ArangoDB
        assert b"result-marker-" in seen
        assert (tmp_path / "jobs.sqlite3-wal").stat().st_size == 0

        assert await store.take_result(ids[0], "alice") == result
        await store.finish(ids[2], RESULT)  # the forgotten job ends: row deleted
        checkpoints = store.checkpoints
        await wait_for_checkpoint(store, checkpoints)
        seen = stored_bytes(tmp_path)
        assert not any(secret.encode() in seen for secret in secrets)
        assert b"result-marker-" not in seen
    finally:
        await store.close()


async def test_frames_a_killed_store_left_behind_are_scrubbed_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "Basic bGVmdC1iZWhpbmQtbWFya2Vy"
    store = await JobStore.open(tmp_path)
    job_id = await store.accept(new_job(auth=secret))
    await store.close()  # the job is in the main file now
    monkeypatch.setattr(writer, "SCRUB_INTERVAL", 3600.0)  # no scrubs while running
    store = await JobStore.open(tmp_path)
    await store.finish(job_id, RESULT)
    # A kill -9 now leaves the wiped page in the WAL and the old one, with the secret,
    # in the main file: copy the files as they are, as a crash would leave them.
    copy = tmp_path / "copy"
    copy.mkdir(mode=0o700)
    for name in DATABASE_FILES:
        if (tmp_path / name).exists():
            (copy / name).write_bytes((tmp_path / name).read_bytes())
    await store.close()
    assert secret.encode() in stored_bytes(copy)
    reopened = await JobStore.open(copy)
    try:
        assert secret.encode() not in stored_bytes(copy)
        assert await reopened.state(job_id, "alice") is JobState.DONE
    finally:
        await reopened.close()


async def test_a_reader_in_the_way_delays_the_scrub_but_never_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scrubs wanted at once and overdue at once: the writer must still interleave.
    monkeypatch.setattr(writer, "SCRUB_INTERVAL", 0.01)
    monkeypatch.setattr(writer, "SCRUB_MAX_DELAY", 0.0)
    secret = "Basic cmVhZGVyLWluLXRoZS13YXk="
    store = await JobStore.open(tmp_path)
    try:
        job_id = await store.accept(new_job(auth=secret))  # no scrub is wanted yet
        # Another process reading the database holds a snapshot: a TRUNCATE
        # checkpoint cannot finish while it lasts.
        reader = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchall()
        checkpoints, attempts = store.checkpoints, store._writer.scrub_attempts
        await store.finish(job_id, RESULT)
        deadline = time.monotonic() + 20
        # writes keep committing while the scrub fails again and again
        while store._writer.scrub_attempts < attempts + 3:
            assert time.monotonic() < deadline, "no scrub was tried"
            await store.finish(await store.accept(new_job()), RESULT)
        assert store.checkpoints == checkpoints
        assert secret.encode() in stored_bytes(tmp_path)  # still in the -wal file
        reader.execute("COMMIT")
        reader.close()
        await wait_for_checkpoint(store, checkpoints)
        assert secret.encode() not in stored_bytes(tmp_path)
    finally:
        await store.close()

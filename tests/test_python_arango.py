"""python-arango, the real driver, against the stand-in directly and through the proxy.

Every scenario runs twice: direct (this proves the stand-in is what the driver
expects) and through the proxy (this proves the proxy is indistinguishable).
The driver is synchronous: each test runs its driver code in a thread while
the servers run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from arango.client import ArangoClient
from arango.exceptions import (
    AQLQueryExecuteError,
    AsyncJobCancelError,
    AsyncJobResultError,
    AsyncJobStatusError,
    CollectionCreateError,
    DocumentInsertError,
    ServerConnectionError,
)

from tests.conftest import ProxyFactory
from tests.standin import StandIn

PASSWORDS = {"root": "", "alice": "alicepw", "bob": "bobpw"}


@pytest.fixture(params=["direct", "through-proxy"])
async def base(request: pytest.FixtureRequest, standin: StandIn, start_proxy: ProxyFactory) -> str:
    """Where the driver connects: the stand-in itself, or the proxy in front of it."""
    if request.param == "direct":
        return standin.url
    return await start_proxy(standin.url)


def wait_for(job: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while job.status() != "done":
        assert time.monotonic() < deadline, f"job {job.id} not done"
        time.sleep(0.005)


async def in_thread(
    url: str, body: Callable[[Any], None], user: str = "root", password: str | None = None
) -> None:
    def run() -> None:
        client = ArangoClient(hosts=url)
        try:
            db = client.db(
                "_system",
                username=user,
                password=PASSWORDS[user] if password is None else password,
                verify=True,
            )
            body(db)
        finally:
            client.close()

    await asyncio.to_thread(run)


async def test_verify_rejects_bad_credentials(base: str, standin: StandIn) -> None:
    with pytest.raises(ServerConnectionError):
        await in_thread(base, lambda db: None, user="alice", password="wrong")


async def test_ordinary_calls(base: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        assert db.version() == "3.12.4"
        assert db.version(details=True)["details"]["role"] == "SINGLE"
        collection = db.create_collection("plain")
        assert db.has_collection("plain")
        assert not db.has_collection("other")
        with pytest.raises(CollectionCreateError):
            db.create_collection("plain")
        meta = collection.insert({"_key": "k1", "v": 1})
        assert meta["_id"] == "plain/k1"
        assert collection.get("k1")["v"] == 1
        assert collection.get("missing") is None
        with pytest.raises(DocumentInsertError) as info:
            collection.insert({"_key": "k1"})
        assert info.value.error_code == 1210
        assert info.value.http_code == 409
        assert collection.replace({"_key": "k1", "v": 2})["_key"] == "k1"
        assert collection.update({"_key": "k1", "w": 3})["_key"] == "k1"
        assert collection.get("k1")["v"] == 2
        assert collection.get("k1")["w"] == 3
        assert collection.delete("k1")["_key"] == "k1"
        assert collection.get("k1") is None
        with pytest.raises(AQLQueryExecuteError) as error:
            db.aql.execute("THIS IS NOT AQL")
        assert error.value.error_code == 1501

    await in_thread(base, body)
    assert standin.write_count("_system", "plain", "k1") == 2


async def test_cursor_is_read_to_the_end(base: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        collection = db.create_collection("docs")
        collection.insert_many([{"_key": str(i), "i": i} for i in range(25)])
        cursor = db.aql.execute("FOR d IN docs RETURN d", batch_size=4, count=True)
        assert cursor.count() == 25
        assert [d["i"] for d in cursor] == list(range(25))
        retry = db.aql.execute("FOR d IN docs RETURN d", batch_size=10, allow_retry=True)
        assert len(list(retry)) == 25
        assert retry.close(ignore_missing=True) in (True, False)

    await in_thread(base, body)


async def test_async_jobs_with_results(base: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        db.create_collection("c")
        adb = db.begin_async_execution(return_result=True)
        job = adb.collection("c").insert({"_key": "a", "n": 1})
        wait_for(job)
        assert job.result()["_id"] == "c/a"
        with pytest.raises(AsyncJobStatusError):  # fetched: gone
            job.status()
        with pytest.raises(AsyncJobResultError):
            job.result()

        duplicate = adb.collection("c").insert({"_key": "a"})
        wait_for(duplicate)
        with pytest.raises(DocumentInsertError) as info:
            duplicate.result()
        assert info.value.error_code == 1210

        version = adb.version()
        wait_for(version)
        assert version.id in db.async_jobs("done")
        assert version.id not in db.async_jobs("pending")
        assert version.clear() is True
        assert version.clear(ignore_missing=True) is False

        query = adb.aql.execute("FOR d IN c RETURN d", batch_size=1, count=True)
        wait_for(query)
        cursor = query.result()
        assert cursor.count() == 1
        assert [d["_key"] for d in cursor] == ["a"]

    await in_thread(base, body)
    assert standin.write_count("_system", "c", "a") == 2


async def test_cancel_and_clear(base: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        adb = db.begin_async_execution(return_result=True)
        slow = adb.aql.execute("RETURN SLEEP(5)")
        assert slow.status() == "pending"
        assert slow.id in db.async_jobs("pending", count=10)
        assert slow.cancel() is True
        wait_for(slow)
        with pytest.raises(AQLQueryExecuteError) as info:
            slow.result()
        # 1500 when the query was killed; 21 when the cancel came before it started
        # (through the proxy, when the job was still in the proxy's store)
        assert info.value.http_code == 410
        assert info.value.error_code in (21, 1500)
        assert slow.cancel(ignore_missing=True) is False
        with pytest.raises(AsyncJobCancelError):
            slow.cancel()

        quick = [adb.version() for _ in range(3)]
        for job in quick:
            wait_for(job)
        assert len(db.async_jobs("done", count=2)) == 2
        assert db.clear_async_jobs(threshold=int(time.time()) + 10) is True
        assert db.async_jobs("done") == []
        again = adb.version()
        wait_for(again)
        assert db.clear_async_jobs() is True
        assert db.async_jobs("done") == []

    await in_thread(base, body)


async def test_fire_and_forget_returns_none(base: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        db.create_collection("f")
        adb = db.begin_async_execution(return_result=False)
        assert adb.collection("f").insert({"_key": "x"}) is None
        deadline = time.monotonic() + 10
        while db.collection("f").get("x") is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert db.async_jobs("done") == []

    await in_thread(base, body)
    assert standin.write_count("_system", "f", "x") == 1


async def test_users_do_not_see_each_others_jobs(base: str, standin: StandIn) -> None:
    ids: dict[str, str] = {}

    def alice(db: Any) -> None:
        job = db.begin_async_execution(return_result=True).version()
        wait_for(job)
        ids["alice"] = job.id

    def bob(db: Any) -> None:
        assert ids["alice"] not in db.async_jobs("done")
        assert db.clear_async_jobs() is True

    def alice_again(db: Any) -> None:
        assert db.async_jobs("done") == [ids["alice"]]

    await in_thread(base, alice, user="alice")
    await in_thread(base, bob, user="bob")
    await in_thread(base, alice_again, user="alice")

"""python-arango, the real driver, talks to the stand-in through the proxy.

python-arango is synchronous; each test runs its driver code in a thread
while the proxy and the stand-in serve on the test's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from arango.client import ArangoClient
from arango.exceptions import (
    AsyncJobResultError,
    AsyncJobStatusError,
    DocumentInsertError,
)

from tests.conftest import ProxyFactory
from tests.standin import StandIn


def wait_for(job: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while job.status() != "done":
        assert time.monotonic() < deadline, f"job {job.id} not done"
        time.sleep(0.01)


@pytest.fixture
async def proxy(standin: StandIn, start_proxy: ProxyFactory) -> str:
    return await start_proxy(standin.url)


async def in_thread(proxy: str, body: Callable[[Any], None], user: str = "root") -> None:
    passwords = {"root": "", "alice": "alicepw", "bob": "bobpw"}

    def run() -> None:
        client = ArangoClient(hosts=proxy)
        try:
            db = client.db("_system", username=user, password=passwords[user], verify=True)
            body(db)
        finally:
            client.close()

    await asyncio.to_thread(run)


async def test_ordinary_calls_pass_through(proxy: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        assert db.version() == "3.12.4"
        db.create_collection("plain")
        collection = db.collection("plain")
        meta = collection.insert({"_key": "k1", "v": 1})
        assert meta["_id"] == "plain/k1"
        assert collection.get("k1")["v"] == 1
        assert collection.get("missing") is None
        with pytest.raises(DocumentInsertError) as info:
            collection.insert({"_key": "k1"})
        assert info.value.error_code == 1210
        assert [d["_key"] for d in db.aql.execute("FOR d IN plain RETURN d")] == ["k1"]

    await in_thread(proxy, body)
    assert standin.write_count("_system", "plain", "k1") == 2


async def test_async_jobs_with_results(proxy: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        db.create_collection("c")
        adb = db.begin_async_execution(return_result=True)
        job = adb.collection("c").insert({"_key": "a", "n": 1})
        wait_for(job)
        assert job.status() == "done"
        assert job.result()["_id"] == "c/a"
        # fetched: the job is gone, as in ArangoDB
        with pytest.raises(AsyncJobStatusError):
            job.status()

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
        with pytest.raises(AsyncJobResultError):
            version.result()

    await in_thread(proxy, body)
    assert standin.write_count("_system", "c", "a") == 2


async def test_cancel_clear_and_listing(proxy: str) -> None:
    def body(db: Any) -> None:
        adb = db.begin_async_execution(return_result=True)
        slow = adb.aql.execute("RETURN SLEEP(3)")
        assert slow.status() == "pending"
        assert slow.id in db.async_jobs("pending", count=10)
        assert slow.cancel() is True
        wait_for(slow)
        with pytest.raises(Exception) as info:  # noqa: PT011 - python-arango picks the class
            slow.result()
        assert getattr(info.value, "http_code", None) == 410

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

    await in_thread(proxy, body)


async def test_fire_and_forget_returns_none_and_runs(proxy: str, standin: StandIn) -> None:
    def body(db: Any) -> None:
        db.create_collection("f")
        adb = db.begin_async_execution(return_result=False)
        assert adb.collection("f").insert({"_key": "x"}) is None
        deadline = time.monotonic() + 20
        while db.collection("f").get("x") is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert db.async_jobs("done") == []
        assert db.async_jobs("pending") == []

    await in_thread(proxy, body)
    assert standin.write_count("_system", "f", "x") == 1


async def test_async_aql_cursor_is_read_to_the_end(proxy: str) -> None:
    def body(db: Any) -> None:
        db.create_collection("docs")
        for i in range(25):
            db.collection("docs").insert({"_key": str(i), "i": i})
        adb = db.begin_async_execution(return_result=True)
        job = adb.aql.execute("FOR d IN docs RETURN d", batch_size=4, count=True)
        wait_for(job)
        cursor = job.result()
        assert cursor.count() == 25
        assert sorted(d["i"] for d in cursor) == list(range(25))

    await in_thread(proxy, body)


async def test_users_do_not_see_each_others_jobs(proxy: str) -> None:
    ids: dict[str, str] = {}

    def alice(db: Any) -> None:
        job = db.begin_async_execution(return_result=True).version()
        wait_for(job)
        ids["alice"] = job.id

    def bob(db: Any) -> None:
        assert ids["alice"] not in db.async_jobs("done")
        db.clear_async_jobs()

    def alice_again(db: Any) -> None:
        assert db.async_jobs("done") == [ids["alice"]]

    await in_thread(proxy, alice, user="alice")
    await in_thread(proxy, bob, user="bob")
    await in_thread(proxy, alice_again, user="alice")

"""How the proxy learns whether ArangoDB trusts an origin (proxy.cors): asked once,
remembered for a while and asked again behind the answer it gave, never waited for
long, and while ArangoDB gives no answer, asked again only now and then. That its
answers carry the same CORS headers as ArangoDB's is a conformance test
(tests/test_jobs_conformance.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import cors
from proxy.cors import Origins
from proxy.errors import upstream_failure
from proxy.upstream import Reply, Upstream
from tests.conftest import ProxyFactory
from tests.standin.client import Client, basic
from tests.standin.pytest_plugin import StandInFactory


class Answering:
    """An upstream that answers each preflight with `allowed`, once `ready` is set;
    or fails, as an unreachable ArangoDB, when `allowed` is None."""

    def __init__(self, allowed: str | None) -> None:
        self.allowed = allowed
        self.ready = asyncio.Event()
        self.ready.set()
        self.asked: list[tuple[str, str, str]] = []

    async def call(self, method: str, target: str, headers: CIMultiDict[str]) -> Reply:
        self.asked.append((method, target, headers["Origin"]))
        await self.ready.wait()
        if self.allowed is None:
            raise upstream_failure(ConnectionRefusedError(), "http://arangodb")
        fields = CIMultiDict({"access-control-allow-credentials": self.allowed})
        if self.allowed == "":  # an answer without the header
            fields.clear()
        return Reply(200, CIMultiDictProxy(fields), b"")


def origins(upstream: Answering, ttl: float = 60.0, max_entries: int = 1000) -> Origins:
    return Origins(cast(Upstream, upstream), ttl, max_entries)


async def test_arangodb_is_asked_once_for_each_origin_however_many_ask_at_once() -> None:
    upstream = Answering("true")
    upstream.ready.clear()
    known = origins(upstream)
    asking = [asyncio.create_task(known.allows_credentials("http://a")) for _ in range(5)]
    await asyncio.sleep(0.01)
    upstream.ready.set()
    assert await asyncio.gather(*asking) == [True] * 5
    assert await known.allows_credentials("http://a") is True
    assert await known.allows_credentials("http://b") is True
    assert upstream.asked == [
        ("OPTIONS", "/_api/version", "http://a"),
        ("OPTIONS", "/_api/version", "http://b"),
    ]


async def test_an_answer_stands_for_the_ttl_then_while_arangodb_is_asked_again() -> None:
    upstream = Answering("false")
    known = origins(upstream, ttl=0.0)
    assert await known.allows_credentials("http://a") is False
    upstream.allowed = "true"  # (ArangoDB restarted with another --http.trusted-origin)
    assert await known.allows_credentials("http://a") is False  # asked again, behind it
    await asyncio.sleep(0.01)
    assert await known.allows_credentials("http://a") is True
    assert len(upstream.asked) >= 2


async def test_an_answer_waits_for_arangodb_a_moment_only_and_takes_its_reply_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cors, "ASK_WAIT", 0.05)
    upstream = Answering("true")
    upstream.ready.clear()  # ArangoDB does not answer (yet)
    known = origins(upstream)
    assert await asyncio.wait_for(known.allows_credentials("http://a"), 5) is False
    upstream.ready.set()
    await asyncio.sleep(0.01)
    assert await known.allows_credentials("http://a") is True
    assert len(upstream.asked) == 1  # the question under way was not asked again


@pytest.mark.parametrize("answer", [None, ""], ids=["unreachable", "no such header"])
async def test_without_an_answer_no_origin_is_trusted_and_arangodb_is_asked_now_and_then(
    monkeypatch: pytest.MonkeyPatch, answer: str | None
) -> None:
    upstream = Answering(answer)
    known = origins(upstream)
    assert await known.allows_credentials("http://a") is False
    assert await known.allows_credentials("http://a") is False
    assert len(upstream.asked) == 1  # not again at once: no answer waits for a dead ArangoDB
    monkeypatch.setattr(cors, "RETRY_AFTER", 0.0)
    upstream.allowed = answer
    known = origins(upstream)
    assert await known.allows_credentials("http://a") is False
    upstream.allowed = "true"
    assert await known.allows_credentials("http://a") is False  # (RETRY_AFTER: asked again)
    await asyncio.sleep(0.01)
    assert await known.allows_credentials("http://a") is True


async def test_without_an_answer_what_arangodb_said_last_stands() -> None:
    upstream = Answering("true")
    known = origins(upstream, ttl=0.0)
    assert await known.allows_credentials("http://a") is True
    upstream.allowed = None  # ArangoDB gone
    assert await known.allows_credentials("http://a") is True
    await asyncio.sleep(0.01)
    assert await known.allows_credentials("http://a") is True
    assert len(upstream.asked) == 2


async def test_the_least_recently_learnt_origin_is_forgotten_first() -> None:
    upstream = Answering("true")
    known = origins(upstream, max_entries=2)
    for origin in ("http://a", "http://b", "http://c", "http://c", "http://b", "http://a"):
        await known.allows_credentials(origin)
    assert [origin for _, _, origin in upstream.asked] == [
        "http://a",
        "http://b",
        "http://c",
        "http://a",
    ]


async def test_headers_the_answer_has_are_kept_as_arangodb_keeps_them() -> None:
    """(A stored result may have them: ArangoDB lets a Foxx service set its own.)"""
    upstream = Answering("true")
    headers: dict[str, Any] = {
        "access-control-allow-origin": "http://set.by.service",
        "access-control-allow-credentials": "false",
    }
    await origins(upstream).apply("http://a", headers)
    assert headers == {
        "access-control-allow-origin": "http://set.by.service",
        "access-control-allow-credentials": "false",
        "access-control-expose-headers": cors.EXPOSED,
    }
    assert upstream.asked == []


async def test_answers_while_arangodb_is_unreachable_trust_no_origin_until_it_is_back(
    standin_factory: StandInFactory,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cors, "RETRY_AFTER", 0.2)
    standin = await standin_factory(trusted_origins=("*",))
    client = Client(http, await start_proxy(standin.url))
    assert (await client.call("GET", "/_api/job/done")).status == 200  # the caller, verified
    await standin.go_offline()
    cors_request = {"origin": "http://app"}
    answer = await client.call("GET", "/_api/job/done", headers=cors_request)
    assert answer.status == 200  # from the proxy's store
    assert answer.headers["access-control-allow-credentials"] == "false"
    await standin.go_online()

    seen = []  # (asked again RETRY_AFTER after the unanswered question)
    for _ in range(100):
        answer = await client.call("GET", "/_api/job/done", headers=cors_request)
        seen.append(answer.headers["access-control-allow-credentials"])
        if seen[-1] == "true":
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == "true"


async def test_a_result_carries_the_cors_headers_of_whoever_fetches_it(
    standin_factory: StandInFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The job's own request carries its submitter's Origin to ArangoDB; when
    ArangoDB refuses it (here: its user's password changed while the job waited),
    that refusal becomes the result, and its CORS headers are ArangoDB's for the
    submitter's origin: a fetch from another page gets its own, as from ArangoDB."""
    standin = await standin_factory()
    client = Client(http, await start_proxy(standin.url))
    standin.queue_full = True  # the job waits in the proxy
    alice = basic("alice", "alicepw")
    submitted = await client.call(
        "GET",
        "/_api/version",
        headers={"origin": "http://a", "x-arango-async": "store"},
        user=alice,
    )
    job = submitted.async_id
    standin.authenticator.users["alice"] = "changed"
    standin.queue_full = False
    renewed = basic("alice", "changed")
    for _ in range(200):
        answer = await client.call(
            "PUT", f"/_api/job/{job}", headers={"origin": "http://b"}, user=renewed
        )
        if answer.async_id is not None:
            break
        await asyncio.sleep(0.05)
    assert (answer.status, answer.json["errorNum"]) == (401, 11)
    assert answer.headers.getall("access-control-allow-origin") == ["http://b"]

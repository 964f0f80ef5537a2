"""The job facade answers exactly as ArangoDB: every scenario runs against the
stand-in directly and through the proxy, and the recorded answers must be equal.

Job ids differ between the two (the proxy has its own), so each id is replaced
by the name the scenario gave it before comparing. Status, body, Content-Type
and x-arango-async-id (as sent: the id as the request spelled it) are compared
for every call.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tests.conftest import ProxyFactory
from tests.standin import StandIn
from tests.standin.client import ALICE, BOB, ROOT, Answer, Client, RawClient, basic
from tests.standin.pytest_plugin import StandInFactory
from tests.standin.server import STANDARD_HEADERS

SLEEP = {"query": "RETURN SLEEP(3)"}
SHORT_SLEEP = {"query": "RETURN SLEEP(0.4)"}


class Recorder:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.ids: dict[str, str] = {}
        self.log: list[tuple[str, Any]] = []

    def _path(self, template: str) -> str:
        return template.format(**self.ids)

    def _normal(self, value: Any) -> Any:
        """Job ids, where the job API puts them, replaced by the scenario's names."""
        names = {job_id: f"<{name}>" for name, job_id in self.ids.items()}
        if isinstance(value, list):
            return [self._normal(item) for item in value]
        if isinstance(value, dict):
            return {key: self._normal(item) for key, item in value.items()}
        if isinstance(value, str):
            if value in names:
                return names[value]
            return re.sub(r"\((\d+)\)", lambda m: f"({names.get(m[1], m[1])})", value)
        return value

    async def submit(
        self,
        name: str,
        method: str,
        path: str,
        body: Any = None,
        user: dict[str, str] = ROOT,
        mode: str = "store",
    ) -> None:
        self.ids[name] = await self.client.submit(
            method, self._path(path), body, user=user, mode=mode
        )

    async def wait(self, name: str, user: dict[str, str] = ROOT) -> None:
        await self.client.wait_done(self.ids[name], user=user)

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: dict[str, str] = ROOT,
        body: Any = None,
        headers: dict[str, str] | None = None,
        count_only: bool = False,
        label: str | None = None,
    ) -> Answer:
        answer = await self.client.call(method, self._path(path), body, headers=headers, user=user)
        content: Any = answer.body.decode(errors="replace")
        json_type = (answer.content_type or "").startswith("application/json")
        if json_type and answer.body:  # a HEAD answer has the type but no body
            content = self._normal(json.loads(content))
            if isinstance(content, list):
                content = len(content) if count_only else sorted(content)
            elif isinstance(content, dict) and content.get("server") == "arango":
                content = "<version>"
        async_id = answer.async_id
        if async_id is not None:  # each id in it (00<a>, <a>junk) by its name
            names = {job_id: f"<{name}>" for name, job_id in self.ids.items()}
            async_id = re.sub(r"[1-9][0-9]*", lambda m: names.get(m[0], m[0]), async_id)
        self.log.append(
            (label or f"{method} {path}", (answer.status, content, answer.content_type, async_id))
        )
        return answer


async def bad_requests(r: Recorder) -> None:
    for method, path in [
        ("PUT", "/_api/job"),
        ("PUT", "/_api/job/notthere"),
        ("PUT", "/_api/job/1/2/3"),
        ("PUT", "/_api/job/123/foo"),
        ("PUT", "/_api/job/notthere/cancel"),
        ("PUT", "/_api/job/99999999999999/cancel"),
        ("PUT", "/_api/job/18446744073709551616/cancel"),
        ("GET", "/_api/job"),
        ("GET", "/_api/job/foo"),
        ("GET", "/_api/job/0"),
        ("GET", "/_api/job/all"),
        ("GET", "/_api/job/1/2"),
        ("GET", "/_api/job/18446744073709551615"),
        ("GET", "/_api/job/99999999999999999999999"),
        ("DELETE", "/_api/job"),
        ("DELETE", "/_api/job/expired"),
        ("DELETE", "/_api/job/AreYouThere"),
        ("DELETE", "/_api/job/a/b"),
        ("DELETE", "/_api/job/99999999999"),
        ("POST", "/_api/job/1"),
        ("PATCH", "/_api/job/done"),
        ("HEAD", "/_api/job/1"),
        ("GET", "/_admin/job/foo"),
        ("GET", "/_db/_system/_admin/job/pending"),
        ("GET", "/_api/job/done?count=abc"),
    ]:
        await r.call(method, path)


async def done_lifecycle(r: Recorder) -> None:
    await r.submit("a", "PUT", "/_api/version")
    await r.wait("a")
    await r.call("GET", "/_api/job/{a}")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")
    await r.call("PUT", "/_api/job/{a}/cancel")
    await r.call("PUT", "/_api/job/{a}")
    await r.call("PUT", "/_api/job/{a}")
    await r.call("GET", "/_api/job/{a}")
    await r.call("DELETE", "/_api/job/{a}")


async def raw_ids(r: Recorder) -> None:
    """ArangoDB reads an id's leading digits (std::from_chars) and sends the id back
    in x-arango-async-id as the request spelled it."""
    for name in "ab":
        await r.submit(name, "GET", "/_api/version")
        await r.wait(name)
    await r.call("GET", "/_api/job/{a}junk")
    await r.call("PUT", "/_api/job/00{a}")
    await r.call("GET", "/_api/job/{a}")
    await r.call("PUT", "/_api/job/{b}junk")
    await r.call("PUT", "/_api/job/{b}")


async def error_result(r: Recorder) -> None:
    await r.submit("a", "POST", "/_api/document/nosuchcollection", body={"x": 1})
    await r.wait("a")
    await r.call("PUT", "/_api/job/{a}")


async def pending_job(r: Recorder) -> None:
    await r.submit("b", "POST", "/_api/cursor", body=SLEEP)
    await r.call("GET", "/_api/job/{b}")
    await r.call("PUT", "/_api/job/{b}")
    await r.call("GET", "/_api/job/pending")
    await r.call("GET", "/_api/job/done")
    await r.call("DELETE", "/_api/job/{b}")
    await r.call("GET", "/_api/job/{b}")
    await r.call("GET", "/_api/job/pending")


async def counts(r: Recorder) -> None:
    for name in "abc":
        await r.submit(name, "GET", "/_api/version")
    for name in "abc":
        await r.wait(name)
    for query in ("?count=0", "?count=1", "?count=2", "?count=abc", "", "?count=1000"):
        await r.call("GET", f"/_api/job/done{query}", count_only=True)
    # read as ArangoDB reads a query string (HttpRequest::parseUrl): no value, or an
    # `=` that ends it, is no count (the default); a name runs up to its `=`, an `&`
    # included; the last of repeated names counts
    for query in ("?count", "?count=", "?count=&x=1", "?x&count=1", "?count=3&count=1"):
        await r.call("GET", f"/_api/job/done{query}", count_only=True)


async def expired(r: Recorder) -> None:
    await r.submit("a", "GET", "/_api/version")
    await r.wait("a")
    await r.submit("b", "POST", "/_api/cursor", body=SLEEP)
    await r.call("DELETE", "/_api/job/expired")
    for stamp in ("0", "abc", "-5"):
        await r.call("DELETE", f"/_api/job/expired?stamp={stamp}")
        await r.call("GET", "/_api/job/done")
        await r.call("GET", "/_api/job/pending")
    # no stamp, as ArangoDB reads the query string (a 400; yarl would read a stamp in
    # each, and the last would delete every job); an empty one is 0
    later = f"{time.time() + 10:.3f}"
    for query in ("stamp", "stamp=", f"x&stamp={later}", f"stamp[]={later}", "stamp=&x=1"):
        await r.call("DELETE", f"/_api/job/expired?{query}", label=f"expired?{query[:8]}")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")
    await r.call("DELETE", f"/_api/job/expired?stamp={later}", label="expired?stamp=now+10")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")


async def expired_between(r: Recorder) -> None:
    """A stamp between jobs: pending ones go by when they were created, done ones by
    when they finished."""
    await r.submit("early", "POST", "/_api/cursor", body=SLEEP)  # pending, created before
    await r.submit("a", "GET", "/_api/version")
    await r.wait("a")  # done before
    await asyncio.sleep(0.05)
    stamp = f"{time.time():.6f}"
    await asyncio.sleep(0.05)
    await r.submit("b", "GET", "/_api/version")
    await r.wait("b")  # done after
    await r.submit("late", "POST", "/_api/cursor", body=SLEEP)  # pending, created after
    await r.call("DELETE", f"/_api/job/expired?stamp={stamp}", label="expired?stamp=between")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")


async def deleted_while_running(r: Recorder) -> None:
    """A job deleted while it runs does not come back when it finishes: its result
    is dropped (ArangoDB's job manager forgets it; the proxy, having fetched it,
    stores nothing). `after`, sent next and as long, is done once it is."""
    await r.submit("gone", "POST", "/_api/cursor", body=SHORT_SLEEP)
    await r.submit("after", "POST", "/_api/cursor", body=SHORT_SLEEP)
    await r.call("DELETE", "/_api/job/{gone}")
    await r.wait("after")
    await asyncio.sleep(0.2)  # (a fetch of the other under way meanwhile ends)
    await r.call("GET", "/_api/job/{gone}")
    await r.call("PUT", "/_api/job/{gone}")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")


async def delete_all(r: Recorder) -> None:
    await r.submit("a", "GET", "/_api/version")
    await r.wait("a")
    await r.submit("b", "POST", "/_api/cursor", body=SLEEP)
    await r.call("DELETE", "/_api/job/all")
    await r.call("GET", "/_api/job/done")
    await r.call("GET", "/_api/job/pending")
    await r.call("GET", "/_api/job/{a}")


async def users(r: Recorder) -> None:
    await r.submit("a", "GET", "/_api/version", user=ALICE)
    await r.wait("a", user=ALICE)
    await r.submit("b", "GET", "/_api/version", user=BOB)
    await r.wait("b", user=BOB)
    for method, path in [
        ("GET", "/_api/job/{a}"),
        ("PUT", "/_api/job/{a}/cancel"),
        ("DELETE", "/_api/job/{a}"),
        ("GET", "/_api/job/done"),
        ("DELETE", "/_api/job/expired?stamp=99999999999"),
        ("DELETE", "/_api/job/all"),
        ("PUT", "/_api/job/{a}"),
    ]:
        await r.call(method, path, user=BOB)
    await r.call("GET", "/_api/job/{a}", user=ROOT)  # Basic root is not a superuser
    await r.call("GET", "/_api/job/done", user=ALICE)
    await r.call("PUT", "/_api/job/{a}", user=ALICE)


async def databases(r: Recorder) -> None:
    await r.submit("a", "GET", "/_db/_system/_api/version")
    await r.wait("a")
    await r.call("GET", "/_db/_system/_admin/job/{a}")
    await r.call("PUT", "/_admin/job/{a}")


async def refused(r: Recorder) -> None:
    wrong = basic("alice", "wrong")
    await r.call("GET", "/_api/job/done", user=wrong)
    await r.call("GET", "/_db/nope/_api/job/done")
    await r.call("GET", "/_api/version", user=wrong, headers={"x-arango-async": "store"})
    await r.call("GET", "/_db/nope/_api/version", headers={"x-arango-async": "true"})


async def async_values(r: Recorder) -> None:
    for value in ("TRUE", "Store", "false", "1", ""):
        await r.call("GET", "/_api/version", headers={"x-arango-async": value})
    await r.submit("f", "GET", "/_api/version", mode="true")
    await r.call("GET", "/_api/job/pending")
    await r.call("GET", "/_api/job/done")


async def async_job_api(r: Recorder) -> None:
    await r.submit("a", "GET", "/_api/version")
    await r.wait("a")
    await r.submit("b", "PUT", "/_api/job/{a}")
    await r.wait("b")
    await r.call("PUT", "/_api/job/{b}")
    await r.call("PUT", "/_api/job/{a}")


async def cancel_pending(r: Recorder) -> None:
    await r.submit("b", "POST", "/_api/cursor", body=SLEEP)
    await r.call("PUT", "/_api/job/{b}/cancel")
    await r.wait("b")
    answer = await r.call("PUT", "/_api/job/{b}")
    # ArangoDB gives 21 if the job had not started, 1500 if the query was killed
    r.log[-1] = (r.log[-1][0], (answer.status, answer.json["errorNum"] in (21, 1500)))


SCENARIOS: dict[str, Callable[[Recorder], Awaitable[None]]] = {
    f.__name__: f
    for f in (
        bad_requests,
        done_lifecycle,
        raw_ids,
        error_result,
        pending_job,
        counts,
        expired,
        expired_between,
        deleted_while_running,
        delete_all,
        users,
        databases,
        refused,
        async_values,
        async_job_api,
        cancel_pending,
    )
}


async def _clean(client: Client) -> None:
    for user in (ROOT, ALICE, BOB):
        await client.call("DELETE", "/_api/job/all", user=user)


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_facade_answers_like_arangodb(
    name: str, standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    scenario = SCENARIOS[name]
    direct = Recorder(Client(http, standin.url))
    await scenario(direct)
    await _clean(direct.client)
    proxied = Recorder(Client(http, await start_proxy(standin.url)))
    await scenario(proxied)
    assert proxied.log == direct.log


# the headers ArangoDB puts on every answer, as the stand-in does (spec 1.1), but
# the queue time, whose value varies
STANDARD = ("server", *(name for name, _ in STANDARD_HEADERS))


async def test_the_proxys_own_answers_carry_arangodbs_standard_headers(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The facade's answers, the 202s and the proxy's errors carry the headers ArangoDB
    puts on every answer, as ArangoDB sent them last (the queue time's value varies),
    on both of the proxy's paths (a %-escape in the path takes aiohttp's). The
    proxy's own /_proxy/... do not."""
    direct = RawClient(http, standin.url)
    proxy = RawClient(http, await start_proxy(standin.url))
    calls: list[tuple[str, str, dict[str, str], dict[str, str]]] = [
        ("GET", "/_api/job/done", {}, ROOT),
        ("GET", "/_api/job/%64one", {}, ROOT),
        ("PUT", "/_api/job/123456", {}, ROOT),
        ("PUT", "/_api/job", {}, ROOT),
        ("GET", "/_api/job/done", {}, basic("alice", "wrong")),
        ("PUT", "/_api/version", {"x-arango-async": "store"}, ROOT),
        ("PUT", "/_api/%76ersion", {"x-arango-async": "true"}, ROOT),
    ]
    for method, path, headers, user in calls:
        answers = [await c.call(method, path, headers=headers, user=user) for c in (direct, proxy)]
        assert answers[0].status == answers[1].status, (method, path)
        for name in STANDARD:
            assert answers[1].headers.getall(name) == answers[0].headers.getall(name), name
        assert answers[1].headers.getone("x-arango-queue-time-seconds")
    health = await proxy.call("GET", "/_proxy/health", user={})
    assert "x-content-type-options" not in health.headers


def cors_headers(answer: Answer) -> list[tuple[str, str]]:
    return sorted(
        (name.lower(), value)
        for name, value in answer.headers.items()
        if name.lower().startswith("access-control-")
    )


async def test_the_proxys_own_answers_carry_arangodbs_cors_headers(
    standin_factory: StandInFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """To a request with an Origin ArangoDB's answers carry the origin, whether it
    may send credentials (only a trusted origin) and the headers a browser may read;
    and so do the proxy's own: its 202s, the facade's answers (a replayed result
    too), its refusals; passed through, a preflight gets ArangoDB's. The proxy asks
    ArangoDB about each origin once, however many answers need it at once."""
    standin = await standin_factory(trusted_origins=("http://trusted",))
    direct = Client(http, standin.url)
    proxy = Client(http, await start_proxy(standin.url))
    wrong = basic("alice", "wrong")
    for origin, credentials in (("http://trusted", "true"), ("http://elsewhere/", "false")):
        seen = []
        for client in (direct, proxy):
            cors = {"origin": origin}
            submitted = await client.call(
                "PUT", "/_api/version", headers={**cors, "x-arango-async": "store"}
            )
            assert submitted.async_id is not None
            await client.wait_done(submitted.async_id)
            answers = await asyncio.gather(
                client.call("PUT", f"/_api/job/{submitted.async_id}", headers=cors),
                client.call("GET", "/_api/job/done", headers=cors),
                client.call("PUT", "/_api/job/123456", headers=cors),
                client.call("PUT", "/_api/job/1/2/3", headers=cors),
                client.call("GET", "/_api/job/done", headers=cors, user=wrong),
                client.call("PUT", "/_api/version", headers={**cors, "x-arango-async": "true"}),
                client.call("GET", "/_api/version", headers=cors),
                client.call(
                    "OPTIONS",
                    "/_api/job/done",
                    headers={**cors, "access-control-request-headers": "x-arango-async"},
                    user={},
                ),
            )
            seen.append([(submitted.status, cors_headers(submitted))])
            seen[-1].extend((answer.status, cors_headers(answer)) for answer in answers)
        assert seen[1] == seen[0], origin
        assert ("access-control-allow-origin", origin) in seen[0][0][1]
        assert ("access-control-allow-credentials", credentials) in seen[0][0][1]
    asked = [
        target
        for method, target, _ in standin.received
        if (method, target) == ("OPTIONS", "/_api/version")
    ]
    assert len(asked) == 2  # one question for each origin


async def test_of_repeated_header_fields_the_last_counts_as_in_arangodb(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """ArangoDB keeps the last of a header field sent twice (HttpRequest::setHeader
    overwrites), and so does the proxy: `x-arango-async: false` then `store` is a job
    (through the proxy one of its own, which its facade knows: passed through, its id
    would be ArangoDB's), `store` then `false` runs at once; of two credentials the
    second is the caller, for a submission and for the job API."""

    def credential(user: dict[str, str]) -> tuple[str, str]:
        [(name, value)] = user.items()
        return name, value

    root, alice, bob = credential(ROOT), credential(ALICE), credential(BOB)
    wrong = credential(basic("alice", "wrong"))
    false, store = ("x-arango-async", "false"), ("x-arango-async", "store")
    seen = []
    for base in (standin.url, await start_proxy(standin.url)):
        client = Client(http, base)

        async def call(verb: str, path: str, *fields: tuple[str, str], base: str = base) -> Answer:
            async with http.request(verb, base + path, headers=list(fields)) as resp:
                body = await resp.read()
                return Answer(resp.status, body, CIMultiDictProxy(CIMultiDict(resp.headers)))

        job = await call("PUT", "/_api/version", root, false, store)
        assert (job.status, job.body) == (202, b"")
        assert job.async_id is not None
        assert (await client.result(job.async_id)).json["server"] == "arango"
        at_once = await call("PUT", "/_api/version", root, store, false)
        assert (at_once.status, at_once.async_id) == (200, None)
        refused = await call("PUT", "/_api/version", alice, wrong, store)
        alices = await call("PUT", "/_api/version", wrong, alice, store)
        assert alices.async_id is not None
        await client.wait_done(alices.async_id, user=ALICE)
        as_bob = await call("GET", f"/_api/job/{alices.async_id}", alice, bob)
        as_alice = await call("GET", f"/_api/job/{alices.async_id}", bob, alice)
        seen.append((refused.status, refused.json["errorNum"], as_bob.status, as_alice.status))
    assert seen[0] == seen[1] == (401, 11, 404, 200)

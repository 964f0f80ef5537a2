"""Jobs belong to users: every job verb, by every kind of caller, through the proxy.

Alice and Bob (Basic auth) each own a done and a pending job; a superuser JWT
(no ``preferred_username``, signed with the stand-in's secret) owns none. Each
caller then uses one verb on Alice's jobs. The answer, and what every user
still owns afterwards, must equal what the stand-in (which follows ArangoDB,
spec §8) answers directly; on top, no answer to one user names another's job
and nothing of another user changes. Callers ArangoDB refuses (wrong password,
unknown user, no credentials, a forged superuser token) get ArangoDB's 401 for
every verb, and nothing changes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory
from tests.standin import StandIn
from tests.standin.auth import make_jwt
from tests.standin.client import ALICE, BOB, Client, basic
from tests.standin.pytest_plugin import StandInFactory
from tests.test_jobs_conformance import SLEEP, Recorder

SECRET = "isolation-test-secret"


def bearer(secret: str, claims: dict[str, Any]) -> dict[str, str]:
    return {"authorization": "bearer " + make_jwt(secret, claims)}


SUPERUSER = bearer(SECRET, {"iss": "arangodb", "server_id": "isolation"})
OWNERS = {"alice": ALICE, "bob": BOB}
CALLERS = {**OWNERS, "superuser": SUPERUSER}
REFUSED = {
    "wrong password": basic("alice", "not-alicepw"),
    "unknown user": basic("mallory", "x"),
    "no credentials": {},
    "forged superuser token": bearer("guessed-secret", {"iss": "arangodb"}),
    "token for an unknown user": bearer(SECRET, {"iss": "arangodb", "preferred_username": "eve"}),
}

# Each verb on Alice's jobs (one call per target), or on the caller's own view.
VERBS: dict[str, list[tuple[str, str]]] = {
    "status": [("GET", "/_api/job/{alice_done}"), ("GET", "/_api/job/{alice_pending}")],
    "fetch": [("PUT", "/_api/job/{alice_done}"), ("PUT", "/_api/job/{alice_pending}")],
    "cancel": [
        ("PUT", "/_api/job/{alice_pending}/cancel"),
        ("PUT", "/_api/job/{alice_done}/cancel"),
    ],
    "delete one": [("DELETE", "/_api/job/{alice_done}"), ("DELETE", "/_api/job/{alice_pending}")],
    "delete all": [("DELETE", "/_api/job/all")],
    "delete expired": [("DELETE", "/_api/job/expired?stamp=<future>")],
    "list done": [("GET", "/_api/job/done")],
    "list pending": [("GET", "/_api/job/pending")],
}

Snapshot = dict[str, list[str]]


@pytest.fixture
async def standin_jwt(standin_factory: StandInFactory) -> StandIn:
    # two runs (direct, proxied) keep two SLEEP jobs each busy
    return await standin_factory(auth=True, jwt_secret=SECRET, workers=8)


async def owned_jobs(r: Recorder) -> None:
    for owner, user in OWNERS.items():
        await r.submit(f"{owner}_done", "PUT", "/_api/version", user=user)
        await r.wait(f"{owner}_done", user=user)
        await r.submit(f"{owner}_pending", "POST", "/_api/cursor", body=SLEEP, user=user)


async def snapshot(r: Recorder) -> Snapshot:
    """Which jobs (by name) each owner still has, done or pending, as the owner sees them."""
    names = {job_id: name for name, job_id in r.ids.items()}
    owned: Snapshot = {}
    for owner, user in OWNERS.items():
        found: list[str] = []
        for kind in ("pending", "done"):  # a job only moves on: none slips between
            answer = await r.client.call("GET", f"/_api/job/{kind}", user=user)
            assert answer.status == 200, answer
            found += [names.get(job_id, job_id) for job_id in answer.json]
        owned[owner] = sorted(set(found))
    return owned


async def run_verb(r: Recorder, caller: dict[str, str], verb: str) -> Snapshot:
    await owned_jobs(r)
    for method, template in VERBS[verb]:
        future = f"{time.time() + 1000:.3f}"
        await r.call(method, template.replace("<future>", future), user=caller, label=template)
    return await snapshot(r)


async def both_ways(
    standin: StandIn,
    proxy: str,
    http: aiohttp.ClientSession,
    scenario: Callable[[Recorder], Awaitable[Snapshot]],
) -> tuple[Recorder, Snapshot]:
    """Run `scenario` against the stand-in, then the proxy; both must see the same."""
    direct = Recorder(Client(http, standin.url))
    direct_after = await scenario(direct)
    proxied = Recorder(Client(http, proxy))
    proxied_after = await scenario(proxied)
    assert proxied.log == direct.log
    assert proxied_after == direct_after
    return proxied, proxied_after


ALL_JOBS = {"alice": ["alice_done", "alice_pending"], "bob": ["bob_done", "bob_pending"]}


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("caller", list(CALLERS))
async def test_every_verb_sees_and_changes_only_what_arangodb_allows(
    caller: str,
    verb: str,
    standin_jwt: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(standin_jwt.url)

    async def scenario(r: Recorder) -> Snapshot:
        return await run_verb(r, CALLERS[caller], verb)

    proxied, after = await both_ways(standin_jwt, proxy, http, scenario)
    answers = [outcome for _, outcome in proxied.log]
    if caller == "superuser":
        if verb in ("delete all", "delete expired"):
            assert after == {"alice": [], "bob": []}
        if verb == "list done":
            assert answers[0][:2] == (200, ["<alice_done>", "<bob_done>"])
        if verb == "list pending":
            assert answers[0][:2] == (200, ["<alice_pending>", "<bob_pending>"])
        return
    other = "bob" if caller == "alice" else "alice"
    # nothing of the other user changed ...
    assert after[other] == ALL_JOBS[other]
    # ... and no list shows one of the other user's jobs (a 404 may echo the id sent)
    listed = [name for _, body, *_ in answers if isinstance(body, list) for name in body]
    assert all(name.startswith(f"<{caller}_") for name in listed)
    if caller == "bob" and verb in ("status", "fetch", "cancel", "delete one"):
        # Alice's jobs are exactly like missing ones
        assert [status for status, *_ in answers] == [404, 404]
        assert after["alice"] == ALL_JOBS["alice"]


@pytest.mark.parametrize("who", list(REFUSED))
async def test_refused_callers_get_arangodb_401_for_every_verb(
    who: str, standin_jwt: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standin_jwt.url)

    async def scenario(r: Recorder) -> Snapshot:
        await owned_jobs(r)
        for calls in VERBS.values():
            for method, template in calls:
                path = template.replace("<future>", f"{time.time() + 1000:.3f}")
                for prefix in ("", "/_db/_system"):
                    await r.call(method, prefix + path, user=REFUSED[who], label=template)
        return await snapshot(r)

    proxied, after = await both_ways(standin_jwt, proxy, http, scenario)
    assert after == ALL_JOBS
    for label, (status, body, content_type, has_id) in proxied.log:
        assert status == 401, label
        assert body == {
            "error": True,
            "errorNum": 11,
            "errorMessage": "not authorized to execute this request",
            "code": 401,
        }
        assert content_type == "application/json; charset=utf-8"
        assert not has_id

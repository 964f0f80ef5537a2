"""Who a caller is, and how verification with ArangoDB is cached."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import auth
from proxy.auth import Verifier, database_of, user_of
from proxy.config import UpstreamConfig
from proxy.upstream import Upstream
from tests.conftest import ProxyFactory
from tests.standin import StandIn, make_jwt
from tests.standin.call import Identity
from tests.standin.client import ALICE, BOB, ROOT, Client, RawClient, basic
from tests.standin.pytest_plugin import StandInFactory


def jwt(claims: dict[str, object]) -> str:
    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


@pytest.mark.parametrize(
    ("header", "user"),
    [
        (None, ""),
        ("", ""),
        ("Basic " + base64.b64encode(b"alice:pw:with:colons").decode(), "alice"),
        ("basic " + base64.b64encode(b"root:").decode(), "root"),
        ("Bearer " + jwt({"preferred_username": "bob", "iss": "arangodb"}), "bob"),
        ("bearer " + jwt({"iss": "arangodb", "server_id": "x"}), ""),  # superuser token
        ("bearer " + jwt({"preferred_username": 7}), ""),
        ("Basic " + base64.b64encode(b"alice").decode(), "\x00unreadable"),  # no password
        ("Basic " + base64.b64encode(b":pw").decode(), "\x00unreadable"),  # no user
        # decoded as ArangoDB does: up to the first '=' or other character, no padding
        ("Basic YWxpY2U6cHc", "alice"),
        ("Basic Ym9iOmJwdw!", "bob"),
        ("Basic " + base64.b64encode(b"carol:x").decode() + "=junk", "carol"),
        ("Basic !!!notbase64", "\x00unreadable"),
        ("Bearer not-a-jwt", "\x00unreadable"),
        ("Negotiate abc", "\x00unreadable"),
    ],
)
def test_user_of(header: str | None, user: str) -> None:
    assert user_of(header) == user


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/_api/version", ("_system", "_system")),
        ("/_db/shop/_api/job/1", ("shop", "shop")),
        ("/_db/my%20db/_api/job?x=1", ("my db", "my%20db")),
        ("/_db/only", ("only", "only")),
        ("/_db/q?x=/y", ("q", "q")),
        ("//_db//shop//_api/job", ("shop", "shop")),  # ArangoDB collapses slashes
    ],
)
def test_database_of(path: str, expected: tuple[str, str]) -> None:
    assert database_of(path) == expected


# -- Verifier: what is asked of ArangoDB, and what is remembered -----------------------

CHECK = "/_db/_system/_api/version"
WRONG = basic("alice", "wrong")["authorization"]


class Clock:
    """Monotonic time the test moves: a TTL cannot be fast-forwarded for real."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time() + self.now - 1000.0  # the wall clock, moved as far


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(auth, "time", fake)
    return fake


@pytest.fixture
async def upstream(standin: StandIn) -> AsyncIterator[Upstream]:
    connection = Upstream(UpstreamConfig(url=standin.url))
    await connection.start()
    yield connection
    await connection.close()


def checks(standin: StandIn, authorization: str | None = None, path: str = CHECK) -> int:
    """Credential checks the stand-in received (for one header, if given)."""
    return sum(
        1
        for _, raw_path, header in standin.received
        if raw_path == path and (authorization is None or header == authorization)
    )


async def test_a_positive_answer_is_remembered_for_the_ttl(
    standin: StandIn, upstream: Upstream, clock: Clock
) -> None:
    verifier = Verifier(upstream, ttl=30)
    for _ in range(3):
        assert await verifier.verify(ALICE["authorization"], "_system") is None
    assert checks(standin) == 1
    clock.now += 29.9
    assert await verifier.verify(ALICE["authorization"], "_system") is None
    assert checks(standin) == 1
    clock.now += 0.2  # expired: ask again
    assert await verifier.verify(ALICE["authorization"], "_system") is None
    assert checks(standin) == 2
    # the same credentials for another database are another question
    refusal = await verifier.verify(ALICE["authorization"], "nope")
    assert refusal is not None
    assert refusal.status == 404
    assert checks(standin, path="/_db/nope/_api/version") == 1


async def test_a_jwt_is_remembered_no_longer_than_its_exp(
    standin_factory: StandInFactory, clock: Clock
) -> None:
    """ArangoDB refuses a token once its `exp` has passed: a verdict on it must not
    outlive that, whatever the TTL."""
    standin = await standin_factory(jwt_secret=SECRET)
    connection = Upstream(UpstreamConfig(url=standin.url))
    await connection.start()
    try:
        verifier = Verifier(connection, ttl=30)
        token = bearer({"preferred_username": "alice", "exp": time.time() + 5})["authorization"]
        for _ in range(2):
            assert await verifier.verify(token, "_system") is None
        assert checks(standin, token) == 1
        assert verifier.known_caller(token, "/_api/job/done") is not None
        clock.now += 5.1  # past its exp, well within the TTL: asked again
        assert verifier.known_caller(token, "/_api/job/done") is None
        await verifier.verify(token, "_system")
        assert checks(standin, token) == 2
    finally:
        await connection.close()


async def test_a_known_caller_is_the_caller_that_caller_of_gives(
    standin_factory: StandInFactory,
) -> None:
    """What the fast path asks (`known_caller`, no await) agrees with `caller_of` for
    remembered credentials, and leaves to it the tokens it cannot judge alone."""
    standin = await standin_factory(jwt_secret=SECRET)
    connection = Upstream(UpstreamConfig(url=standin.url))
    await connection.start()
    try:
        verifier = Verifier(connection, ttl=30)
        alice, root = ALICE["authorization"], ROOT["authorization"]
        limited = bearer({"preferred_username": "bob", "allowed_paths": ["/_api/job/done"]})
        assert verifier.known_caller(alice, "/_db/_system/_api/job/done") is None  # not yet
        for authorization in (alice, root, limited["authorization"]):
            assert await verifier.verify(authorization, "_system") is None
        for authorization, target in ((alice, "/_db/_system/_api/job/done"), (root, "/x?y")):
            known = verifier.known_caller(authorization, target)
            assert known is not None
            assert known == await verifier.caller_of(authorization, target)
        assert verifier.known_caller(alice, "/_db/other/_api/job/done") is None
        # (caller_of checks the path against allowed_paths)
        assert verifier.known_caller(limited["authorization"], "/_api/job/done") is None
        # the remembered verdicts hold user names, never credentials
        assert not any(alice.split()[1] in str(known) for known in verifier._verified.values())
    finally:
        await connection.close()


async def test_a_refusal_is_never_remembered(
    standin: StandIn, upstream: Upstream, clock: Clock
) -> None:
    verifier = Verifier(upstream, ttl=30)
    for asked in range(1, 4):
        refusal = await verifier.verify(WRONG, "_system")
        assert refusal is not None
        assert refusal.status == 401
        assert json.loads(refusal.body)["errorNum"] == 11  # type: ignore[arg-type]
        assert refusal.headers.getall("WWW-Authenticate")[0] == 'Basic, realm="ArangoDB"'
        assert checks(standin, WRONG) == asked
    for asked in range(1, 3):
        assert await verifier.verify(ALICE["authorization"], "nope") is not None
        assert checks(standin, path="/_db/nope/_api/version") == asked
    # the right password still works, and only that one is remembered
    assert await verifier.verify(ALICE["authorization"], "_system") is None
    assert await verifier.verify(WRONG, "_system") is not None
    assert checks(standin, WRONG) == 4


async def test_the_cache_is_bounded_least_recently_used_out_first(
    standin: StandIn, upstream: Upstream, clock: Clock
) -> None:
    verifier = Verifier(upstream, ttl=30, max_entries=2)
    headers = [ROOT["authorization"], ALICE["authorization"], BOB["authorization"]]
    for header in headers:  # root is pushed out by bob
        assert await verifier.verify(header, "_system") is None
    assert len(verifier._verified) == 2
    assert await verifier.verify(BOB["authorization"], "_system") is None
    assert await verifier.verify(ALICE["authorization"], "_system") is None
    assert [checks(standin, header) for header in headers] == [1, 1, 1]
    assert await verifier.verify(ROOT["authorization"], "_system") is None  # bob out
    assert [checks(standin, header) for header in headers] == [2, 1, 1]
    # a caller at work stays: alice, used after root came, outlives him
    assert verifier.known_caller(ALICE["authorization"], "/_api/version") is not None
    assert await verifier.verify(BOB["authorization"], "_system") is None  # root out
    assert await verifier.verify(ALICE["authorization"], "_system") is None  # (remembered)
    assert await verifier.verify(ROOT["authorization"], "_system") is None  # bob out
    assert [checks(standin, header) for header in headers] == [3, 1, 2]
    # the cache holds keyed digests, never the credentials
    assert all(len(key) == 32 for key in verifier._verified)
    assert not any(b"YWxpY2U" in key for key in verifier._verified)


async def test_concurrent_checks_of_new_credentials_share_one_request(
    standin: StandIn, upstream: Upstream
) -> None:
    verifier = Verifier(upstream, ttl=30)
    answers = await asyncio.gather(
        *(verifier.verify(ALICE["authorization"], "_system") for _ in range(10)),
        *(verifier.verify(WRONG, "_system") for _ in range(10)),
    )
    assert answers[:10] == [None] * 10
    assert all(answer is not None and answer.status == 401 for answer in answers[10:])
    assert checks(standin, ALICE["authorization"]) == 1
    assert checks(standin, WRONG) == 1


async def test_requests_whose_checks_are_shared_each_get_their_refusal(
    serve_app: Callable[[web.Application], Awaitable[str]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Requests with the same unknown credentials at once share one check with
    ArangoDB (here a slow one): each still gets its own refusal sent, on aiohttp's path
    too (a chunked body goes there), where one response object sent twice reaches only
    the first client."""
    checks = []

    async def slow_refusal(request: web.Request) -> web.Response:
        checks.append(request.path)
        await asyncio.sleep(0.3)
        body = {"code": 401, "error": True, "errorMessage": "not authorized", "errorNum": 11}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow_refusal)
    proxy = await start_proxy(await serve_app(app))
    wrong = basic("alice", "wrong")

    async def call(method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        async with http.request(
            method, proxy + path, headers={**wrong, **headers}, data=b"{}", chunked=True
        ) as resp:
            return resp.status, (await resp.json())["errorNum"]

    calls = [("PUT", "/_api/version", {"x-arango-async": "store"}), ("GET", "/_api/job/1", {})]
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*(call(*one) for one in calls * 4))
    assert answers == [(401, 11)] * 8
    assert len(checks) < 8  # (the checks were shared)
    metrics = (await Client(http, proxy).call("GET", "/_proxy/metrics")).body.decode()
    handed_over = re.search(r"^\S*connections_handed_over_total (\d+)$", metrics, re.MULTILINE)
    assert handed_over is not None
    assert int(handed_over[1]) >= 8  # each on aiohttp's path


# -- identity through the proxy ---------------------------------------------------------

SECRET = "proxy-test-jwt-secret"


def bearer(claims: dict[str, object]) -> dict[str, str]:
    return {"authorization": "Bearer " + make_jwt(SECRET, {"iss": "arangodb", **claims})}


async def test_a_refusal_has_no_challenge_for_a_request_that_asks_so_on_every_path(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """x-omit-www-authenticate (any value), as ArangoDB: on async submissions and job
    API requests, on the fast path and on aiohttp's (a %-escape in the path goes there)."""
    proxy = RawClient(http, await start_proxy(standin.url))
    direct = RawClient(http, standin.url)
    wrong = basic("alice", "wrong")
    requests = [
        ("GET", "/_api/job/done", {}),
        ("PUT", "/_api/version", {"x-arango-async": "store"}),
        ("PUT", "/_api/%76ersion", {"x-arango-async": "true"}),
        ("PUT", "/_api/job/%31", {}),
    ]
    for method, path, headers in requests:
        for omit in ({}, {"X-Omit-WWW-Authenticate": ""}):
            challenges = []
            for client in (direct, proxy):
                answer = await client.call(method, path, headers={**headers, **omit}, user=wrong)
                assert answer.status == 401
                challenges.append(answer.headers.getall("WWW-Authenticate", []))
            assert challenges[0] == challenges[1]
            assert bool(challenges[0]) == (not omit)


async def test_refused_credentials_are_asked_again_each_time_through_the_proxy(
    standin: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    client = Client(http, await start_proxy(standin.url))
    for asked in range(1, 4):
        for headers in ({"x-arango-async": "store"}, {}):
            path = "/_api/version" if headers else "/_api/job/done"
            answer = await client.call("GET", path, headers=headers, user=basic("alice", "wrong"))
            assert answer.status == 401
            assert answer.json["errorNum"] == 11
        assert checks(standin, WRONG) == 2 * asked
    job = await client.submit("GET", "/_api/version", user=ALICE)
    assert (await client.result(job, user=ALICE)).status == 200


async def test_jwt_users_and_the_superuser_token_through_the_proxy(
    standin_factory: StandInFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    standin = await standin_factory(jwt_secret=SECRET)
    client = Client(http, await start_proxy(standin.url))
    alice_token = bearer({"preferred_username": "alice"})
    bob_token = bearer({"preferred_username": "bob", "exp": time.time() + 3600})
    superuser = bearer({"server_id": "ops"})
    alices = await client.submit("GET", "/_api/version", user=alice_token)
    bobs = await client.submit("GET", "/_api/version", user=bob_token)
    supers = await client.submit("GET", "/_api/version", user=superuser)
    for job, owner in ((alices, alice_token), (bobs, bob_token), (supers, superuser)):
        await client.wait_done(job, user=owner)
    done = (await client.call("GET", "/_api/job/done", user=superuser)).json
    assert sorted(done, key=int) == [alices, bobs, supers]  # the superuser sees every job
    # a token's user is that user, the same as Basic auth with its password
    assert (await client.call("GET", "/_api/job/done", user=alice_token)).json == [alices]
    assert (await client.call("GET", "/_api/job/done", user=ALICE)).json == [alices]
    assert (await client.call("GET", f"/_api/job/{supers}", user=bob_token)).status == 404
    assert (await client.result(bobs, user=BOB)).json["server"] == "arango"
    assert (await client.result(alices, user=superuser)).status == 200
    # tokens ArangoDB refuses are refused, and never cached as good
    forged = {"authorization": "Bearer " + make_jwt("other", {"iss": "arangodb", "server_id": "x"})}
    expired = bearer({"preferred_username": "alice", "exp": time.time() - 1})
    for refused in (forged, expired, forged):
        answer = await client.call("GET", "/_api/job/done", user=refused)
        assert answer.status == 401
    assert checks(standin, forged["authorization"]) == 2


async def test_without_authentication_everyone_is_the_anonymous_superuser(
    standin_noauth: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    client = Client(http, await start_proxy(standin_noauth.url))
    anonymous: dict[str, str] = {}
    anonymous_job = await client.submit("GET", "/_api/version", user=anonymous)
    roots = await client.submit("GET", "/_api/version", user=ROOT)
    await client.wait_done(anonymous_job, user=anonymous)
    await client.wait_done(roots, user=ROOT)
    done = (await client.call("GET", "/_api/job/done", user=anonymous)).json
    assert sorted(done, key=int) == [anonymous_job, roots]
    # a Basic user name still scopes what that caller sees, as in ArangoDB
    assert (await client.call("GET", "/_api/job/done", user=ROOT)).json == [roots]
    assert (await client.call("GET", f"/_api/job/{anonymous_job}", user=ROOT)).status == 404
    assert (await client.result(roots, user=anonymous)).status == 200


@pytest.mark.parametrize(
    "unreadable",
    ["Basic !!!notbase64", "Basic " + base64.b64encode(b"alice").decode(), "Bearer x", "Foo bar"],
)
async def test_credentials_arangodb_ignores_are_the_anonymous_superuser_as_there(
    standin_noauth: StandIn, start_proxy: ProxyFactory, http: aiohttp.ClientSession, unreadable: str
) -> None:
    """With authentication off, ArangoDB takes credentials it cannot read for none at
    all; so does the proxy, on both of its paths (the second call is the fast one)."""
    proxy = Client(http, await start_proxy(standin_noauth.url))
    direct = Client(http, standin_noauth.url)
    caller = {"authorization": unreadable}
    for client in (direct, proxy):
        roots = await client.submit("GET", "/_api/version", user=ROOT)
        theirs = await client.submit("GET", "/_api/version", user=caller)
        await client.wait_done(roots, user=ROOT)
        await client.wait_done(theirs, user=caller)
        for _ in range(2):
            assert (await client.call("GET", f"/_api/job/{roots}", user=caller)).status == 200
            done = (await client.call("GET", "/_api/job/done", user=caller)).json
            assert {roots, theirs} <= set(done)
        assert (await client.result(theirs, user={})).status == 200


async def test_credentials_the_proxy_cannot_read_but_arangodb_takes_see_only_their_jobs(
    standin: StandIn,
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Authentication on: a header the proxy cannot read that ArangoDB accepts anyway
    (a decoder laxer than Python's, say; here the stand-in is made to) is nobody the
    proxy knows, never the superuser."""
    token = "Bearer opaque-token-the-proxy-cannot-read"
    identify = standin.authenticator.identify

    def also_opaque(header: str | None) -> Identity | None:
        return Identity("alice", superuser=False) if header == token else identify(header)

    monkeypatch.setattr(standin.authenticator, "identify", also_opaque)
    client = Client(http, await start_proxy(standin.url))
    alices = await client.submit("GET", "/_api/version", user=ALICE)
    await client.wait_done(alices, user=ALICE)
    caller = {"authorization": token}
    theirs = await client.submit("GET", "/_api/version", user=caller)
    await client.wait_done(theirs, user=caller)
    assert (await client.call("GET", "/_api/job/done", user=caller)).json == [theirs]
    assert (await client.call("GET", f"/_api/job/{alices}", user=caller)).status == 404

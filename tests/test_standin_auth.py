"""Authentication before any handler or queue (spec §1.3, §9), and the headers
every response of the stand-in carries."""

from __future__ import annotations

import base64
import json
import time

import aiohttp
import pytest

from tests.standin import StandIn, make_jwt
from tests.standin.client import ALICE, ROOT, Client, basic
from tests.standin.pytest_plugin import StandInFactory
from tests.standin.server import CORS_METHODS, EXPOSED_CORS_HEADERS

UNAUTHORIZED = (
    b'{"error":true,"errorNum":11,"errorMessage":"not authorized to execute this request",'
    b'"code":401}'
)
NO_DATABASE = b'{"error":true,"errorNum":1228,"errorMessage":"database not found","code":404}'
SECRET = "jwt-secret"


def bearer(claims: dict[str, object], secret: str = SECRET) -> dict[str, str]:
    return {"authorization": "bearer " + make_jwt(secret, claims)}


def unsigned(claims: dict[str, object]) -> dict[str, str]:
    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return {"authorization": f"Bearer {part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"}


@pytest.fixture
async def jwt_client(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> Client:
    server = await standin_factory(jwt_secret=SECRET)
    return Client(standin_http, server.url)


@pytest.mark.parametrize(
    "user",
    [
        {},
        basic("alice", "wrong"),
        basic("nobody"),
        {"authorization": "Basic !!!"},
        {"authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"authorization": "Negotiate abc"},
        {"authorization": "Basic"},
        # no secret set
        {"authorization": "bearer " + make_jwt(SECRET, {"iss": "arangodb", "server_id": "x"})},
    ],
)
async def test_refused_at_once_with_401(
    standin: StandIn, standin_client: Client, user: dict[str, str]
) -> None:
    for headers in ({}, {"x-arango-async": "store"}):
        answer = await standin_client.call("GET", "/_api/version", headers=headers, user=user)
        assert answer.status == 401
        assert answer.body == UNAUTHORIZED
        assert answer.content_type == "application/json; charset=utf-8"
        assert answer.headers.getall("www-authenticate") == [
            'Basic, realm="ArangoDB"',
            'Bearer, token_type="JWT", realm="ArangoDB"',
        ]
        assert answer.async_id is None
    assert standin.executed == {}
    assert (await standin_client.call("GET", "/_api/job/pending")).json == []


async def test_www_authenticate_can_be_omitted(standin_client: Client) -> None:
    answer = await standin_client.call(
        "GET", "/_api/version", headers={"x-omit-www-authenticate": "1"}, user={}
    )
    assert answer.status == 401
    assert "www-authenticate" not in answer.headers


async def test_unknown_database(standin: StandIn, standin_client: Client) -> None:
    for headers in ({}, {"x-arango-async": "true"}, {"x-arango-async": "store"}):
        answer = await standin_client.call("GET", "/_db/nope/_api/version", headers=headers)
        assert (answer.status, answer.body, answer.async_id) == (404, NO_DATABASE, None)
    # without valid credentials the database is not even looked up
    answer = await standin_client.call("GET", "/_db/nope/_api/job/done", user=basic("x", "y"))
    assert answer.status == 401
    assert standin.executed == {}


async def test_scheme_names_are_case_insensitive(standin_client: Client) -> None:
    token = base64.b64encode(b"alice:alicepw").decode()
    for header in (f"basic {token}", f"BASIC  {token}"):
        answer = await standin_client.call("GET", "/_api/version", user={"authorization": header})
        assert answer.status == 200


async def test_passwords_with_colons(standin_factory: StandInFactory) -> None:
    server = await standin_factory(users={"carol": "a:b:c"})
    async with aiohttp.ClientSession() as session:
        client = Client(session, server.url)
        assert (
            await client.call("GET", "/_api/version", user=basic("carol", "a:b:c"))
        ).status == 200
        assert (await client.call("GET", "/_api/version", user=basic("carol", "a:b"))).status == 401


@pytest.mark.parametrize(
    ("user", "status"),
    [
        (bearer({"iss": "arangodb", "preferred_username": "alice"}), 200),
        (bearer({"iss": "arangodb", "server_id": "x"}), 200),
        # parameters are built at collection time: leave the whole run to finish
        (bearer({"iss": "arangodb", "server_id": "x", "exp": time.time() + 3600}), 200),
        (bearer({"iss": "arangodb", "preferred_username": "bob", "exp": time.time() + 3600}), 200),
        (bearer({"iss": "arangodb", "server_id": "x", "exp": time.time() - 1}), 401),
        (bearer({"iss": "arangodb", "preferred_username": "bob", "exp": time.time() - 1}), 401),
        (bearer({"iss": "arangodb", "server_id": "x", "exp": "soon"}), 401),
        (bearer({"iss": "arangodb", "server_id": "x", "exp": True}), 401),
        (bearer({"iss": "arangodb"}), 401),  # neither a user nor a server_id
        (bearer({"server_id": "x"}), 401),
        (bearer({"iss": "somebody"}), 401),
        (bearer({"preferred_username": "alice"}), 401),
        (bearer({"iss": "arangodb", "preferred_username": "mallory"}), 401),
        (bearer({"iss": "arangodb", "preferred_username": ""}), 401),
        (bearer({"iss": "arangodb", "server_id": "x"}, secret="other"), 401),
        (unsigned({"iss": "arangodb", "server_id": "x"}), 401),
        ({"authorization": "Bearer not-a-jwt"}, 401),
        (ALICE, 200),
    ],
)
async def test_jwt(jwt_client: Client, user: dict[str, str], status: int) -> None:
    assert (await jwt_client.call("GET", "/_api/version", user=user)).status == status


async def test_auth_off_accepts_anything(
    standin_noauth: StandIn, standin_http: aiohttp.ClientSession
) -> None:
    client = Client(standin_http, standin_noauth.url)
    for user in ({}, basic("who", "ever"), {"authorization": "Negotiate x"}, unsigned({})):
        assert (await client.call("GET", "/_api/version", user=user)).status == 200
    assert (await client.call("GET", "/_db/nope/_api/version", user={})).body == NO_DATABASE


async def test_standard_headers_on_every_kind_of_response(standin_client: Client) -> None:
    answers = [
        await standin_client.call("GET", "/_api/version"),
        await standin_client.call("GET", "/_api/version", user={}),
        await standin_client.call("GET", "/_api/job/foo"),
        await standin_client.call("GET", "/_api/version", headers={"x-arango-async": "true"}),
        await standin_client.call("GET", "/_api/nothing-here"),
    ]
    for answer in answers:
        assert answer.headers["server"] == "ArangoDB"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"].startswith("no-cache, no-store")
        assert float(answer.headers["x-arango-queue-time-seconds"]) >= 0
    assert answers[-1].json == {
        "code": 404,
        "error": True,
        "errorMessage": "unknown path '/_api/nothing-here'",
        "errorNum": 404,
    }


async def test_cors_preflight_needs_no_credentials(standin_client: Client) -> None:
    answer = await standin_client.call("OPTIONS", "/_api/job/done", user={})
    assert answer.status == 200
    assert "POST" in answer.headers["allow"]
    assert answer.body == b""
    assert not any(name.startswith("access-control-") for name in answer.headers)


CORS = ("access-control-allow-origin", "access-control-allow-credentials")


async def test_a_preflight_with_an_origin_allows_every_method_and_the_headers_asked_for(
    standin_client: Client,
) -> None:
    """`CommTask::processCorsOptions`, then `finishExecution`'s CORS headers."""
    answer = await standin_client.call(
        "OPTIONS",
        "/_api/version",
        headers={
            "origin": "http://app.example",
            "access-control-request-headers": " x-arango-async, authorization ",
        },
        user={},
    )
    assert answer.status == 200
    assert answer.headers["access-control-allow-methods"] == CORS_METHODS
    assert answer.headers["access-control-allow-headers"] == "x-arango-async, authorization"
    assert answer.headers["access-control-max-age"] == "1800"
    assert [answer.headers[name] for name in CORS] == ["http://app.example", "false"]
    bare = await standin_client.call("OPTIONS", "/", headers={"origin": "http://a"}, user={})
    assert "access-control-allow-headers" not in bare.headers


async def test_every_answer_to_a_request_with_an_origin_carries_cors_headers(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> None:
    """The origin sent back, credentials allowed only for a trusted origin (one
    trailing slash ignored), and the headers a browser may read; on refusals and 202s
    too. Of two Origin fields the last counts; an empty one is none."""
    server = await standin_factory(trusted_origins=("http://trusted", "http://other"))
    client = Client(standin_http, server.url)
    seen = {}
    for origin in ("http://trusted", "http://trusted/", "http://nottrusted", "http://other//"):
        for user, headers in (
            (ROOT, {}),
            (basic("alice", "wrong"), {}),
            (ROOT, {"x-arango-async": "store"}),
        ):
            answer = await client.call(
                "GET", "/_api/version", headers={"origin": origin, **headers}, user=user
            )
            assert answer.headers["access-control-allow-origin"] == origin
            assert answer.headers["access-control-expose-headers"] == EXPOSED_CORS_HEADERS
            seen[(origin, answer.status)] = answer.headers["access-control-allow-credentials"]
    assert seen == {
        (origin, status): allowed
        for origin, allowed in [
            ("http://trusted", "true"),
            ("http://trusted/", "true"),
            ("http://nottrusted", "false"),
            ("http://other//", "false"),
        ]
        for status in (200, 401, 202)
    }
    async with standin_http.get(
        server.url + "/_api/version",
        headers=[("origin", "http://nottrusted"), ("origin", "http://trusted"), *ROOT.items()],
    ) as resp:
        assert resp.headers["access-control-allow-origin"] == "http://trusted"
    for headers in ({}, {"origin": ""}):
        answer = await client.call("GET", "/_api/version", headers=headers)
        assert not any(name.startswith("access-control-") for name in answer.headers)


async def test_a_trusted_origin_of_star_trusts_every_origin(
    standin_factory: StandInFactory, standin_http: aiohttp.ClientSession
) -> None:
    server = await standin_factory(trusted_origins=("*",))
    answer = await Client(standin_http, server.url).call(
        "GET", "/_api/version", headers={"origin": "http://anywhere"}
    )
    assert answer.headers["access-control-allow-credentials"] == "true"


async def test_controls_need_no_credentials_and_are_never_async(
    standin: StandIn, standin_client: Client
) -> None:
    answer = await standin_client.call(
        "GET", "/_standin/counters", headers={"x-arango-async": "store"}, user={}
    )
    assert answer.status == 200
    assert answer.json == {"writes": {}, "executed": {}, "repeats": {}, "requests": {}}
    await standin_client.call("GET", "/_api/version", user=ROOT)
    answer = await standin_client.call("GET", "/_standin/counters", user={})
    assert answer.json["executed"] == {"GET /_api/version": 1}
    assert answer.json["requests"] == {"GET /_api/version": 1}

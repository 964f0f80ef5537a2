"""Credentials at rest: what the proxy's files hold, and for how long.

The files are read byte for byte (database, -wal and -shm), as anyone who got
hold of them could. Every test first sees the secret bytes where they should
be, so a scrub that did nothing could not pass.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import harvester
from proxy.app import create_app
from proxy.config import ConfigError
from proxy.tokens import SignedTokens
from tests.conftest import proxy_config
from tests.processes import free_port
from tests.standin import StandIn, make_jwt
from tests.standin.auth import Authenticator
from tests.standin.client import ALICE, BOB, Client, basic, eventually
from tests.standin.pytest_plugin import StandInFactory

SECRET = "the-deployment-jwt-secret"
FILES = ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm")
SLOW = {"query": "RETURN SLEEP(2)"}
VERIFY_PATH = "/_db/_system/_api/version"


def stored_bytes(data: Path) -> bytes:
    return b"".join((data / name).read_bytes() for name in FILES if (data / name).exists())


def bearer(claims: dict[str, object]) -> dict[str, str]:
    return {"authorization": "bearer " + make_jwt(SECRET, {"iss": "arangodb", **claims})}


def claims_of(authorization: str) -> dict[str, Any]:
    payload = authorization.split(" ", 1)[1].split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return claims


@pytest.fixture
async def jwt_standin(standin_factory: StandInFactory) -> StandIn:
    return await standin_factory(jwt_secret=SECRET)


Serve = Callable[..., Awaitable[str]]


async def start(serve_proxy: Serve, upstream: str, data: Path, **upstream_settings: Any) -> str:
    config = proxy_config(upstream, data, upstream=upstream_settings)
    return await serve_proxy(create_app(config))


async def test_client_credentials_leave_the_files_once_harvested_or_cancelled(
    jwt_standin: StandIn, serve_proxy: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    client = Client(http, await start(serve_proxy, jwt_standin.url, data))
    bobs_token = bearer({"preferred_username": "bob"})
    jwt_standin.queue_full = True  # the jobs stay in the proxy's store, with credentials
    harvested = [
        await client.submit("GET", "/_api/version", user=ALICE),
        await client.submit("GET", "/_api/version", user=bobs_token),
    ]
    cancelled = await client.submit("GET", "/_api/version", user=BOB)
    secrets = [h["authorization"].encode() for h in (ALICE, bobs_token, BOB)]
    seen = stored_bytes(data)
    assert all(secret in seen for secret in secrets)
    answer = await client.call("PUT", f"/_api/job/{cancelled}/cancel", user=BOB)
    assert answer.json == {"result": True}
    jwt_standin.queue_full = False
    assert (await client.result(harvested[0], user=ALICE)).status == 200
    assert (await client.result(harvested[1], user=bobs_token)).status == 200
    assert (await client.result(cancelled, user=BOB)).status == 410
    await eventually(lambda: not any(s in stored_bytes(data) for s in secrets), 15)
    assert b"alicepw" not in stored_bytes(data)


def write_secret(folder: Path, text: str = SECRET + "\n") -> Path:
    path = folder / "jwt-secret"
    path.write_text(text)
    path.chmod(0o600)
    return path


async def start_signing(serve_proxy: Serve, upstream: str, data: Path) -> str:
    """The proxy in `upstream.jwt_secret_file` mode, the secret file beside `data`."""
    secret_file = write_secret(data.parent)
    return await start(serve_proxy, upstream, data, jwt_secret_file=str(secret_file))


async def test_with_a_jwt_secret_no_client_credential_is_ever_written(
    jwt_standin: StandIn,
    serve_proxy: Serve,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pending lists no longer than the proxy's jobs: one with all of them is cut short,
    # and the harvester asks for the done list too (as when the user has other jobs
    # pending at ArangoDB), which must carry a signed token as well
    monkeypatch.setattr(harvester, "LIST_SLACK", 0)
    data = tmp_path / "data"
    client = Client(http, await start_signing(serve_proxy, jwt_standin.url, data))
    bobs_token = bearer({"preferred_username": "bob"})
    superuser = bearer({"server_id": "ops"})
    callers = {"alice": ALICE, "bob": bobs_token, "": superuser}
    jwt_standin.queue_full = True  # pending in the proxy's store
    jobs = {
        user: await client.submit("GET", "/_api/version", user=c) for user, c in callers.items()
    }
    client_secrets = [c["authorization"].encode() for c in callers.values()] + [b"YWxpY2U"]
    assert not any(secret in stored_bytes(data) for secret in client_secrets)
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        rows = db.execute("SELECT user, auth FROM jobs ORDER BY id").fetchall()
    db.close()
    assert rows == [("alice", None), ("bob", None), ("", None)]  # the user, nothing else
    jwt_standin.queue_full = False
    for user, job in jobs.items():
        answer = await client.result(job, user=callers[user])
        assert answer.status == 200
        assert answer.json["server"] == "arango"

    # A job cancelled at ArangoDB, and jobs ArangoDB loses in a restart: the
    # cancel and the lost-job checks carry signed tokens too.
    slow = await client.submit("POST", "/_api/cursor", body=SLOW, user=bobs_token)
    lost = await client.submit("POST", "/_api/cursor", body=SLOW, user=ALICE)
    await eventually(lambda: len(jwt_standin.jobs.entries) == 2, 15)
    await client.call("PUT", f"/_api/job/{slow}/cancel", user=bobs_token)
    assert (await client.result(slow, user=bobs_token)).status == 410
    await jwt_standin.restart()
    assert (await client.result(lost, user=ALICE)).status == 201  # run again, as the policy says
    assert not any(secret in stored_bytes(data) for secret in client_secrets)

    # What ArangoDB saw: the client's own header only for the credential checks,
    # everything else with the proxy's tokens for the job's user.
    client_headers = {c["authorization"] for c in callers.values()}
    background = [r for r in jwt_standin.received if r[2] not in client_headers]
    assert all(path == VERIFY_PATH for _, path, h in jwt_standin.received if h in client_headers)
    assert {(m, p.partition("?")[0]) for m, p, _ in background} >= {
        ("GET", "/_api/version"),
        ("POST", "/_api/cursor"),
        ("GET", "/_api/job/done"),
        ("GET", "/_api/job/pending"),
        ("PUT", f"/_api/job/{jwt_standin_id(background, 'cancel')}/cancel"),
    }
    users = set()
    for _, _, header in background:
        assert header is not None
        assert header.startswith("bearer ")
        claims = claims_of(header)
        assert claims["iss"] == "arangodb"
        assert claims["exp"] - claims["iat"] == 600
        users.add(claims.get("preferred_username", claims.get("server_id")))
    assert users == {"alice", "bob", "arango-async-proxy"}


def jwt_standin_id(requests: list[tuple[str, str, str | None]], action: str) -> str:
    """The stand-in's id of the job the proxy cancelled (its ids are not the proxy's)."""
    [path] = [p for m, p, _ in requests if m == "PUT" and p.endswith("/" + action)]
    return path.split("/")[3]


def test_signed_tokens_are_ones_arangodb_accepts_and_are_reused() -> None:
    start = int(time.time())  # the stand-in checks exp against the real clock
    now = [float(start)]
    tokens = SignedTokens(SECRET.encode(), clock=lambda: now[0])
    arangodb = Authenticator({"alice": "x"}, enabled=True, jwt_secret=SECRET)
    alice = tokens.token("alice")
    superuser = tokens.token("")
    assert claims_of("b " + alice) == {
        "iss": "arangodb",
        "preferred_username": "alice",
        "iat": start,
        "exp": start + 600,
    }
    assert claims_of("b " + superuser) == {
        "iss": "arangodb",
        "server_id": "arango-async-proxy",
        "iat": start,
        "exp": start + 600,
    }
    for token, user in ((alice, "alice"), (superuser, "")):
        identity = arangodb.identify("bearer " + token)
        assert identity is not None
        assert (identity.user, identity.superuser) == (user, user == "")
    assert arangodb.identify("bearer " + SignedTokens(b"wrong").token("alice")) is None
    now[0] += 600 - 121  # still two minutes left: the same token
    assert tokens.token("alice") == alice
    now[0] += 2  # less than two minutes left: a new one
    assert tokens.token("alice") != alice
    assert tokens.headers("bob", "Basic ignored")["Authorization"].startswith("bearer ")
    assert tokens.to_store("Basic YWxpY2U6YWxpY2Vwdw==") is None


def test_the_token_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.tokens.MAX_TOKENS", 2)
    tokens = SignedTokens(b"s")
    for user in ("a", "b", "c", "d"):
        tokens.token(user)
    assert len(tokens._tokens) <= 2


def test_the_secret_file_is_read_as_arangodb_reads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_secret(tmp_path, f" \t{SECRET}\r\n\n")
    signed = SignedTokens.from_file(str(path)).token("alice")
    # ArangoDB (the stand-in) with the bare secret accepts it: the whitespace was trimmed
    assert Authenticator({"alice": ""}, True, SECRET).identify("bearer " + signed) is not None
    assert not caplog.records
    path.chmod(0o644)
    SignedTokens.from_file(str(path))
    assert "can be read by others; chmod 600 it" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"upstream\.jwt_secret_file: cannot read .*jwt-secret: No such file or directory"),
        (
            " \n",
            r"upstream\.jwt_secret_file: .*jwt-secret is empty; expected ArangoDB's JWT secret",
        ),
    ],
)
def test_an_unusable_secret_file_is_a_config_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "jwt-secret"
    if content is not None:
        write_secret(tmp_path, content)
    config = proxy_config(
        "http://127.0.0.1:1", tmp_path / "data", upstream={"jwt_secret_file": str(path)}
    )
    with pytest.raises(ConfigError, match=message):
        create_app(config)
    settings = tmp_path / "proxy.toml"
    settings.write_text(f'[upstream]\njwt_secret_file = "{path}"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(settings),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("arango-async-proxy: config error: upstream.jwt_secret_file: ")
    assert not (tmp_path / "data").exists()  # nothing started


async def test_tokens_limited_by_allowed_paths_are_not_queued_with_signed_tokens(
    jwt_standin: StandIn, serve_proxy: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    limited = bearer({"server_id": "x", "allowed_paths": ["/_db/_system/_api/version"]})
    signing = Client(http, await start_signing(serve_proxy, jwt_standin.url, tmp_path / "a"))
    answer = await signing.call(
        "GET", "/_api/version", headers={"x-arango-async": "store"}, user=limited
    )
    assert (answer.status, answer.json["errorNum"], answer.async_id) == (403, 11, None)
    assert "allowed_paths" in answer.json["errorMessage"]
    # nor may it reach the job API, which its allowed_paths do not list (as ArangoDB)
    refused = await signing.call("GET", "/_api/job/pending", user=limited)
    assert (refused.status, refused.json["errorNum"]) == (401, 11)
    # ordinary tokens are fine; with the caller's own header replayed, so is this one
    assert await signing.submit("GET", "/_api/version", user=bearer({"server_id": "x"}))
    replaying = Client(http, await start(serve_proxy, jwt_standin.url, tmp_path / "b"))
    job = await replaying.submit("GET", "/_api/version", user=limited)
    # (its result is for a token that may reach the job API: this one may not)
    assert (await replaying.result(job, user=bearer({"server_id": "x"}))).status == 200


async def test_a_token_limited_by_allowed_paths_reaches_only_those_paths_job_api_included(
    jwt_standin: StandIn, serve_proxy: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """ArangoDB refuses such a token on any other path, before anything runs; the
    proxy's check with /_api/version cannot tell, so the proxy holds it to its paths
    itself: a superuser token for health checks must not list, fetch or delete jobs."""
    client = Client(http, await start(serve_proxy, jwt_standin.url, tmp_path / "data"))
    alices = await client.submit("GET", "/_api/version", user=ALICE)
    await client.wait_done(alices, user=ALICE)
    health = bearer({"server_id": "x", "allowed_paths": ["/_db/_system/_api/version"]})
    for method, path in (
        ("GET", "/_api/job/done"),
        ("PUT", f"/_api/job/{alices}"),
        ("DELETE", "/_api/job/all"),
        ("GET", f"/_db/_system/_api/job/{alices}"),
    ):
        answer = await client.call(method, path, user=health)
        assert (answer.status, answer.json["errorNum"]) == (401, 11), (method, path)
        assert answer.headers.getall("www-authenticate")
    lister = bearer({"server_id": "x", "allowed_paths": ["/_api/job/done"]})
    assert (await client.call("GET", "/_api/job/done", user=lister)).json == [alices]
    assert (await client.result(alices, user=ALICE)).status == 200  # still there


async def test_jobs_whose_credentials_stop_working_at_arangodb_end_saying_so(
    standin: StandIn, serve_proxy: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Running at ArangoDB when its credentials stop working: the job ends (not stuck
    until ArangoDB forgets it) with an error that says it may have run."""
    client = Client(http, await start(serve_proxy, standin.url, tmp_path / "data"))
    job = await client.submit("POST", "/_api/cursor", body=SLOW, user=ALICE)
    await eventually(lambda: len(standin.jobs.entries) == 1, 15)  # running at ArangoDB
    standin.authenticator.users["alice"] = "changed"  # the operator changes her password
    renewed = basic("alice", "changed")
    answer = await client.result(job, user=renewed)
    assert (answer.status, answer.json["errorNum"]) == (500, 4)
    assert "refused this job's credentials (401)" in answer.json["errorMessage"]
    assert (await client.call("GET", "/_api/job/pending", user=renewed)).json == []


@pytest.mark.parametrize(
    ("authorization", "allowed"),
    [
        (None, True),
        ("Basic YWxpY2U6YWxpY2Vwdw==", True),
        (bearer({"server_id": "x"})["authorization"], True),
        (bearer({"server_id": "x", "allowed_paths": ["/_api/version"]})["authorization"], False),
        ("Bearer not-a-jwt", True),  # ArangoDB refuses it first; nothing to limit
    ],
)
def test_which_callers_signed_tokens_can_act_for(authorization: str | None, allowed: bool) -> None:
    assert SignedTokens(b"s").can_act_for(authorization) is allowed
    with pytest.raises(ValueError, match="must not be empty"):
        SignedTokens(b"")


async def test_with_a_jwt_secret_jobs_waiting_for_a_down_arangodb_hold_no_credentials(
    jwt_standin: StandIn, serve_proxy: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    client = Client(http, await start_signing(serve_proxy, jwt_standin.url, data))
    bobs_token = bearer({"preferred_username": "bob"})
    for caller in (ALICE, bobs_token):  # verified now, so accepted while ArangoDB is down
        assert (await client.call("GET", "/_api/job/pending", user=caller)).json == []
    await jwt_standin.stop()
    jobs = [await client.submit("GET", "/_api/version", user=c) for c in (ALICE, bobs_token)]
    assert (await client.call("GET", f"/_api/job/{jobs[0]}", user=ALICE)).status == 204
    assert ALICE["authorization"].encode() not in stored_bytes(data)
    assert bobs_token["authorization"].encode() not in stored_bytes(data)
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        rows = db.execute("SELECT user, auth, state FROM jobs ORDER BY id").fetchall()
    db.close()
    assert rows == [("alice", None, "accepted"), ("bob", None, "accepted")]

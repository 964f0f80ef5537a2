"""Generated hostile requests against the job facade and the intake.

Hypothesis builds paths (prefixes, spellings of the job API, segments that
are words, numbers, signs, escapes or any text), query values, headers,
credentials and bodies, and sends each through the proxy. For every answer:
no 5xx (nothing here reaches a code path that may fail for real), every
error in ArangoDB's shape, and the store changed only as the answer says:
a 202 for ``store`` adds one job, a fetch or a delete that succeeded may
remove jobs, anything else leaves every job where it was.

One stand-in and one proxy serve all examples of a test; Hypothesis runs in
a worker thread and hands each request to the test's event loop. Paths name
the store's jobs by position (``{job2}``), filled in when sent, and the store
is topped up with jobs of Alice and Bob, so requests keep meeting real jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.arango_request import query_params
from proxy.jobs_api import parse_stamp, parse_uint64
from tests.conftest import ProxyFactory
from tests.standin import StandIn
from tests.standin.call import double_decimal, query_values, uint64
from tests.standin.client import ALICE, BOB, basic
from tests.standin.pytest_plugin import StandInFactory
from tests.standin.server import split_database
from tests.test_isolation import SECRET, SUPERUSER, bearer

T = TypeVar("T")

USERS = {
    "alice": ALICE,
    "bob": BOB,
    "superuser": SUPERUSER,
    "wrong password": basic("alice", "nope"),
    "forged token": bearer("guess", {"iss": "arangodb"}),
    "none": {},
}
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

escaped_text = st.text(max_size=12).map(lambda t: quote(t, safe=""))
# "{job3}" stands for the id of the fourth job the store holds when the request
# is sent (see Prober.send), so that requests keep finding jobs as they go;
# padded and with tails too, as ArangoDB's parser still reads them as that id
job_id = st.builds(
    lambda pad, index, tail: f"{pad}{{job{index}}}{tail}",
    st.sampled_from(["", "", "", "0", "00", "+", "-", "%20"]),
    st.integers(min_value=0, max_value=5),
    st.sampled_from(["", "", "", "x", "%00", "%0D%0AX-Injected:%201", ".5", "/cancel"]),
)
segment = st.one_of(
    job_id,
    job_id,
    st.sampled_from(
        [
            *("done", "pending", "all", "expired", "cancel", ""),
            *("0", "007", "+5", "-1", "0x10", "1" * 5000),
            *("..", ".", "%2F", "%00", "%FF", "%D9%A3", "%61ll", "1%0D%0AX-Injected:%201"),
        ]
    ),
    st.integers(min_value=0, max_value=2**70).map(str),
    escaped_text,
)
query = st.lists(st.tuples(st.sampled_from(["count", "stamp", "x"]), escaped_text), max_size=2).map(
    lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs) if pairs else ""
)
facade_path = st.builds(
    lambda prefix, base, segments, q: prefix + base + "".join("/" + s for s in segments) + q,
    st.sampled_from(["", "", "/_db/_system", "//_db//_system/", "/_db/nope", "/_db/%5Fsystem"]),
    st.sampled_from(["/_api/job", "/_api/job", "/_admin/job", "//_api//job"]),
    # mostly one suffix, the shape of every id verb
    st.one_of(*[st.lists(segment, min_size=1, max_size=1)] * 3, st.lists(segment, max_size=3)),
    query,
)
intake_path = st.builds(
    lambda base, tail, q: base + tail + q,
    st.sampled_from(
        [
            *("/_api/version", "/_api/cursor", "/_api/document/c", "/_db/nope/_api/version"),
            *("//_api//version", "/_api/job%2Fall"),
        ]
    ),
    st.sampled_from(["", "/x", "/%00", "/.."]),
    query,
)
extra_headers = st.dictionaries(
    st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    max_size=3,
)


@dataclass(frozen=True)
class Hostile:
    method: str
    path: str
    user: str
    headers: dict[str, str]
    body: bytes


def requests(paths: st.SearchStrategy[str], modes: list[str | None]) -> st.SearchStrategy[Hostile]:
    return st.builds(
        lambda method, path, user, mode, headers, body: Hostile(
            method,
            path,
            user,
            {**headers, **({"x-arango-async": mode} if mode is not None else {})},
            body,
        ),
        st.sampled_from(["GET", "PUT", "DELETE", "GET", "PUT", "DELETE", "POST", "PATCH", "HEAD"]),
        paths,
        st.sampled_from(["alice", "bob", "superuser", *USERS]),
        st.sampled_from(modes),
        extra_headers,
        st.binary(max_size=200),
    )


# The facade without x-arango-async (an async DELETE /_api/job/all would remove
# jobs later, after the answer); the intake with every value ArangoDB tells apart.
FACADE = requests(facade_path, [None])
INTAKE = requests(intake_path, ["store", "true", "STORE", "false"])


def job_suffixes(path: str) -> list[str] | None:
    """The raw suffixes ArangoDB's job handler would get for `path`; None: not the job API."""
    _, rest = split_database(path.partition("?")[0])
    for prefix in ("/_api/job", "/_admin/job"):
        if rest == prefix or rest.startswith(prefix + "/"):
            return [part for part in rest[len(prefix) :].split("/") if part]
    return None


class Prober:
    """Sends requests on the test's loop and keeps the proxy's job list up to date."""

    def __init__(self, http: aiohttp.ClientSession, proxy: str) -> None:
        self.http = http
        self.proxy = proxy
        self.jobs: set[str] = set()
        self.owner: dict[str, str] = {}  # job id -> the user who submitted it

    async def listed(self) -> set[str]:
        found: set[str] = set()
        for kind in ("pending", "done"):  # a job only moves on: none slips between
            async with self.http.get(
                f"{self.proxy}/_api/job/{kind}?count=1000000", headers=SUPERUSER
            ) as resp:
                assert resp.status == 200
                found |= set(json.loads(await resp.read()))
        return found

    async def seed(self) -> None:
        """One done and one pending job for Alice and for Bob."""
        for name in ("alice", "bob"):
            for body in (None, b'{"query":"RETURN SLEEP(5)"}'):
                async with self.http.post(
                    self.proxy + "/_api/cursor",
                    headers={**USERS[name], "x-arango-async": "store"},
                    data=body,
                ) as resp:
                    assert resp.status == 202
                    self.owner[resp.headers["x-arango-async-id"]] = name
        self.jobs = await self.listed()

    async def send(self, hostile: Hostile) -> None:
        if len(self.jobs) < 4:
            await self.seed()
        ids = sorted(self.jobs, key=int)
        path = re.sub(
            r"\{job(\d)\}",
            lambda m: ids[int(m[1])] if int(m[1]) < len(ids) else "123456789",
            hostile.path,
        )
        await self.check(dataclasses.replace(hostile, path=path))

    async def check(self, request: Hostile) -> None:
        async with self.http.request(
            request.method,
            URL(self.proxy + request.path, encoded=True),
            headers=CIMultiDict({**USERS[request.user], **request.headers}),
            data=request.body,
        ) as resp:
            status, body, headers = resp.status, await resp.read(), resp.headers
        assert status < 500, (status, body)
        if len(f"{request.method} {request.path} HTTP/1.1") > 8190:
            # aiohttp's parser refuses a request line this long with a bare 400
            # before any proxy code runs (see README, Hostile input)
            assert status == 400
            assert await self.listed() == self.jobs
            return
        if status >= 400 and request.method != "HEAD":
            assert headers.get("Content-Type") == "application/json; charset=utf-8"
            doc = json.loads(body)
            assert set(doc) == {"error", "errorNum", "errorMessage", "code"}, doc
            assert doc["error"] is True
            assert doc["code"] == status
            assert isinstance(doc["errorNum"], int)
            assert isinstance(doc["errorMessage"], str)
        after = await self.listed()
        new_id = headers.get("x-arango-async-id") if status == 202 else None
        if new_id is not None:
            assert request.headers.get("x-arango-async") == "store"
            assert after == self.jobs | {new_id}, "a 202 stores exactly the job it names"
            self.owner[new_id] = request.user
        elif status == 202:
            assert request.headers.get("x-arango-async") == "true"
            assert after == self.jobs, "fire-and-forget jobs are never listed"
        else:
            self.check_removed(request, status, headers, self.jobs - after)
            assert after <= self.jobs, f"{status} for {request} added a job"
        self.jobs = after

    def check_removed(
        self, request: Hostile, status: int, headers: CIMultiDictProxy[str], removed: set[str]
    ) -> None:
        """Only a fetch or delete that succeeded removes, and only what ArangoDB would."""
        suffixes = job_suffixes(request.path)
        fetched = headers.get("x-arango-async-id")
        if fetched is not None:
            assert request.method == "PUT"
            assert suffixes is not None
            assert fetched == suffixes[0], "the id exactly as sent"
            assert removed == {str(uint64(fetched))}
        if not removed:
            return
        assert request.method in ("PUT", "DELETE"), request
        assert status == 200 or fetched is not None, request
        assert suffixes is not None, request
        assert len(suffixes) == 1, request
        if suffixes[0] not in ("all", "expired") or request.method == "PUT":
            assert removed == {str(uint64(suffixes[0]))}, request
        if request.user != "superuser":
            assert {self.owner[job] for job in removed} == {request.user}, request


def run_threaded(
    loop: asyncio.AbstractEventLoop, step: Callable[[T], Awaitable[None]]
) -> Callable[[T], None]:
    """A blocking version of `step` for Hypothesis' thread, run on the test's `loop`."""

    def blocking(value: T) -> None:
        asyncio.run_coroutine_threadsafe(step(value), loop).result(timeout=30)  # type: ignore[arg-type]

    return blocking


@pytest.fixture
async def prober(
    standin_factory: StandInFactory, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> Prober:
    standin: StandIn = await standin_factory(auth=True, jwt_secret=SECRET, workers=16)
    proxy = await start_proxy(standin.url)
    found = Prober(http, proxy)
    await found.seed()
    assert found.jobs == set(found.owner)
    assert len(found.jobs) == 4
    return found


@pytest.mark.parametrize("kind", ["facade", "intake"])
async def test_generated_requests_get_arango_errors_and_change_only_what_they_say(
    kind: str, prober: Prober
) -> None:
    strategy = FACADE if kind == "facade" else INTAKE
    send = run_threaded(asyncio.get_running_loop(), prober.send)

    @SETTINGS
    @given(strategy)
    def check(request: Hostile) -> None:
        send(request)

    await asyncio.to_thread(check)
    async with prober.http.get(prober.proxy + "/_proxy/health") as resp:
        assert resp.status == 200


@settings(max_examples=300, derandomize=True, database=None)
@given(
    st.one_of(
        st.text(),
        st.from_regex(r"[-+]?[0-9]{0,30}(\.[0-9]{0,10})?([eE][-+]?[0-9]{0,4})?.?", fullmatch=True),
    )
)
def test_the_facade_parses_numbers_as_the_standin(text: str) -> None:
    """Job ids, count and stamp: the proxy's parsers agree with ArangoDB's (as copied)."""
    assert parse_uint64(text) == uint64(text)
    ours, theirs = parse_stamp(text), double_decimal(text)
    if math.isinf(theirs):
        assert ours == theirs
    else:
        # the stand-in adds digits one by one, float() rounds once: equal up to rounding
        assert math.isclose(ours, theirs, rel_tol=1e-12, abs_tol=0.0) or ours == theirs


@settings(max_examples=500, derandomize=True, database=None)
@given(st.text(alphabet="ab=&%2+[]é", max_size=14))
def test_the_proxy_reads_query_strings_as_the_standin(raw: str) -> None:
    """A raw query string's parameters as ArangoDB's HttpRequest::parseUrl reads them:
    the proxy's reading (proxy.arango_request) and the stand-in's agree."""
    assert query_params(raw) == query_values(raw)

"""A raw HTTP client for the stand-in's own tests: every call keeps status,
headers (all values, lower-case names) and the exact body bytes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL


def basic(user: str, password: str = "") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


ROOT = basic("root")
ALICE = basic("alice", "alicepw")
BOB = basic("bob", "bobpw")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def async_id(self) -> str | None:
        return self.headers.get("x-arango-async-id")


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    def url(self, path: str) -> str | URL:
        return self.base + path  # (yarl normalizes it: %76 becomes v, /a/../b /b)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        user: dict[str, str] = ROOT,
    ) -> Answer:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        async with self.session.request(
            method, self.url(path), data=data, headers={**user, **(headers or {})}
        ) as resp:
            payload = await resp.read()
            return Answer(resp.status, payload, CIMultiDictProxy(CIMultiDict(resp.headers)))

    async def submit(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: dict[str, str] = ROOT,
        mode: str = "store",
    ) -> str:
        """Queue a request; returns its job id ("" for fire-and-forget)."""
        answer = await self.call(method, path, body, headers={"x-arango-async": mode}, user=user)
        assert answer.status == 202, answer
        assert answer.body == b""
        if mode == "true":
            assert answer.async_id is None
            return ""
        assert answer.async_id is not None
        return answer.async_id

    async def wait_done(
        self, job_id: str, *, user: dict[str, str] = ROOT, seconds: float = 10.0
    ) -> None:
        deadline = time.monotonic() + seconds
        while True:
            answer = await self.call("GET", f"/_api/job/{job_id}", user=user)
            if answer.status == 200:
                return
            assert answer.status == 204, answer
            assert time.monotonic() < deadline, f"job {job_id} not done in {seconds} s"
            await asyncio.sleep(0.005)

    async def result(self, job_id: str, *, user: dict[str, str] = ROOT) -> Answer:
        """Wait for a job and fetch its stored response."""
        await self.wait_done(job_id, user=user)
        answer = await self.call("PUT", f"/_api/job/{job_id}", user=user)
        assert answer.async_id == job_id, answer
        return answer


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until `condition()` holds: for state the stand-in changes in the background."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


class RawClient(Client):
    """Sends every path exactly as written: yarl would resolve `..` and decode the
    %-escapes of characters that need none (``/_api/%76ersion`` would leave as
    ``/_api/version``, and take the proxy's fast path)."""

    def url(self, path: str) -> URL:
        return URL(self.base + path, encoded=True)

"""A small raw-HTTP client for job tests: submit async requests, wait, fetch."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

ASYNC_ID = "x-arango-async-id"


def basic(user: str, password: str = "") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ROOT = basic("root")
ALICE = basic("alice", "alicepw")
BOB = basic("bob", "bobpw")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def async_id(self) -> str | None:
        return self.headers.get(ASYNC_ID)


class JobClient:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> Answer:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        async with self.session.request(
            method, self.base + path, headers=headers or ROOT, data=data
        ) as resp:
            payload = await resp.read()
            return Answer(resp.status, payload, {k.lower(): v for k, v in resp.headers.items()})

    async def submit(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        mode: str = "store",
    ) -> str:
        answer = await self.call(
            method, path, headers={**(headers or ROOT), "x-arango-async": mode}, body=body
        )
        assert answer.status == 202, answer
        assert answer.body == b""
        if mode == "true":
            assert answer.async_id is None
            return ""
        assert answer.async_id is not None
        return answer.async_id

    async def wait_done(
        self, job_id: str, headers: dict[str, str] | None = None, within: float = 20.0
    ) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            answer = await self.call("GET", f"/_api/job/{job_id}", headers=headers)
            if answer.status == 200:
                return
            assert answer.status == 204, answer
            await asyncio.sleep(0.01)
        raise AssertionError(f"job {job_id} not done within {within} s")

    async def result(self, job_id: str, headers: dict[str, str] | None = None) -> Answer:
        await self.wait_done(job_id, headers)
        answer = await self.call("PUT", f"/_api/job/{job_id}", headers=headers)
        assert answer.async_id == job_id, answer
        return answer

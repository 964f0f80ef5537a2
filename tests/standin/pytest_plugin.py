"""pytest fixtures for the stand-in; registered by tests/conftest.py.

`standin`: auth on, users root (no password), alice/alicepw, bob/bobpw.
`standin_noauth`: auth off. Both are started on an ephemeral port for one test.
`standin_factory`: start more, with any `StandIn` arguments; all stopped at the end.
`standin_http`: an aiohttp session that changes nothing (no decompression).
`standin_client`: a raw HTTP client (tests/standin/client.py) for `standin`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest_asyncio

from tests.standin.client import Client
from tests.standin.server import DEFAULT_USERS, StandIn

StandInFactory = Callable[..., Awaitable[StandIn]]


@pytest_asyncio.fixture
async def standin_factory() -> AsyncIterator[StandInFactory]:
    started: list[StandIn] = []

    async def start(**kwargs: Any) -> StandIn:
        kwargs.setdefault("users", dict(DEFAULT_USERS))
        server = StandIn(**kwargs)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


@pytest_asyncio.fixture
async def standin(standin_factory: StandInFactory) -> StandIn:
    return await standin_factory(auth=True)


@pytest_asyncio.fixture
async def standin_noauth(standin_factory: StandInFactory) -> StandIn:
    return await standin_factory(auth=False)


@pytest_asyncio.fixture
async def standin_http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest_asyncio.fixture
async def standin_client(standin: StandIn, standin_http: aiohttp.ClientSession) -> Client:
    return Client(standin_http, standin.url)

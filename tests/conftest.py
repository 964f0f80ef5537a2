"""Shared fixtures: the proxy in-process or as a real process, and an echo upstream."""

from __future__ import annotations

import asyncio
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import Config, load_config
from proxy.listener import Listener
from proxy.state import CONFIG
from proxy.tls import server_context
from storage import JobStore
from tests.processes import ProxyProcess

pytest_plugins = ["tests.standin.pytest_plugin"]

ProxyFactory = Callable[..., Awaitable[str]]

STACKS_BEFORE_TIMEOUT = 5.0  # seconds before pytest-timeout fails a test
CALL_TIMEOUT = 30.0  # seconds: the longest one HTTP call of a test may take


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Shortly before pytest-timeout stops a test, print the stack of every asyncio
    task of the test's loop. Its own dump shows the threads only: a hung async test
    is an idle loop in select(), and the task stacks show which await never ended."""
    seconds = float(item.config.getini("timeout") or 0) - STACKS_BEFORE_TIMEOUT
    timer = threading.Timer(seconds, _print_task_stacks, (threading.main_thread().ident,))
    timer.daemon = True
    if seconds > 0:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _print_task_stacks(thread_id: int | None) -> None:
    frame = sys._current_frames().get(thread_id or 0)
    while frame is not None:
        loop = frame.f_locals.get("self")
        if isinstance(loop, asyncio.AbstractEventLoop):
            loop.call_soon_threadsafe(_print_stacks, loop)
            return
        frame = frame.f_back


def _print_stacks(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start any aiohttp application on an ephemeral port, as the CLI runs it; its URL.

    With `ssl_context` it serves TLS only, and the URL is https://.
    """
    runners: list[web.AppRunner] = []

    async def start(
        app: web.Application, *, ssl_context: ssl.SSLContext | None = None, **runner_kwargs: Any
    ) -> str:
        runner = web.AppRunner(app, handle_signals=False, **runner_kwargs)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"{'http' if ssl_context is None else 'https'}://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


def proxy_config(upstream: str, data: Path, /, **sections: dict[str, Any]) -> Config:
    """The proxy's settings for a test: listening on an ephemeral port unless told."""
    overrides: dict[str, Any] = {
        "upstream.url": upstream,
        "storage.data": str(data),
        "server.listen": "127.0.0.1:0",
        # in this process, where tests can reach them (tests/test_worker_process.py
        # and the tests of the command run them in the worker process)
        "jobs.workers": "inline",
    }
    for section, values in sections.items():
        for key, value in values.items():
            overrides[f"{section}.{key}"] = value
    return load_config(None, overrides)


@pytest.fixture
async def serve_proxy() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Serve a proxy application in-process as the CLI serves it (the fast path in
    front of aiohttp); its URL, https:// when its config asks for TLS."""
    listeners: list[Listener] = []

    async def serve(app: web.Application) -> str:
        ssl_context = server_context(app[CONFIG].server)
        listener = Listener(app, ssl_context)
        await listener.start()
        listeners.append(listener)
        host, port = listener.addresses[0]
        return f"{'http' if ssl_context is None else 'https'}://{host}:{port}"

    yield serve
    for listener in reversed(listeners):
        await listener.stop()


@pytest.fixture
async def start_proxy(
    serve_proxy: Callable[[web.Application], Awaitable[str]], tmp_path: Path
) -> ProxyFactory:
    """Start the proxy in-process in front of `upstream`; returns its base URL.

    `server={"tls_cert": ..., "tls_key": ...}` makes it serve TLS, as the CLI does.
    """
    started = 0

    async def start(upstream: str, /, **sections: dict[str, Any]) -> str:
        nonlocal started
        started += 1  # each proxy its own data folder (a folder serves one store)
        config = proxy_config(upstream, tmp_path / f"proxy-data-{started}", **sections)
        return await serve_proxy(create_app(config))

    return start


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The job store's data folder for a test."""
    return tmp_path / "data"


@pytest.fixture
async def store(data: Path) -> AsyncIterator[JobStore]:
    store = await JobStore.open(data)
    yield store
    await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that changes nothing: no redirects followed, no decompression. A call
    that hangs fails after CALL_TIMEOUT with its own traceback, well before the test's
    timeout (aiohttp's default would wait 300 s)."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
        yield session


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start `arango-async-proxy` as a real process; killed at the end if still running."""
    started: list[ProxyProcess] = []

    def start(*args: str, data: Path | None = None) -> ProxyProcess:
        proc = ProxyProcess.start(*args, data=data or tmp_path / "proxy-data")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()

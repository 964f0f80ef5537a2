"""Graceful stop (SIGTERM) of the real process, bounded by `server.shutdown_grace`.

Stop accepting, let requests under way and their writes finish, stop dispatching
and harvesting, close the store: exit 0, and after a restart every 202 leads to
its result. A client that holds a request open cannot stretch the stop beyond
the grace (here 1 s against a 60 s body deadline).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.processes import ProxyProcess, StandInProcess, free_port
from tests.standin.client import ROOT
from tests.test_crash import Load, check_every_job, create_collection

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin_process() -> Iterator[StandInProcess]:
    proc = StandInProcess.start("--users", "root:", "--workers", "4", "--queue-size", "64")
    yield proc
    proc.kill()


def config_file(tmp_path: Path, grace: float) -> str:
    path = tmp_path / "proxy.toml"
    listen = f"127.0.0.1:{free_port()}"
    path.write_text(f'[server]\nshutdown_grace = {grace}\nlisten = "{listen}"\n')
    return str(path)


async def test_sigterm_under_load_loses_nothing(
    tmp_path: Path,
    standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    standin = standin_process.url
    config = config_file(tmp_path, 3)
    data = tmp_path / "data"
    async with aiohttp.ClientSession() as session:
        await create_collection(session, standin, "g")
        proxy = proxy_process("--config", config, "--upstream", standin, data=data)
        load = Load(session, "g")
        stop = asyncio.Event()
        clients = asyncio.create_task(load.run(proxy.url, stop, limit=100_000, clients=16))
        for _ in range(1000):  # until the load is well under way
            if len(load.accepted) >= 100:
                break
            await asyncio.sleep(0.02)
        # Within the grace plus a margin for a loaded machine; exit 0 = a clean stop.
        code = await asyncio.to_thread(proxy.stop, timeout=3 + 20)
        stop.set()
        await clients
        assert code == 0, "".join(proxy.output)
        assert "stopping" in "".join(proxy.output)
        assert load.refused == []
        proxy = proxy_process("--config", config, "--upstream", standin, data=data)
        await check_every_job(session, proxy.url, standin, load, exactly_once=set())
        assert proxy.stop() == 0


async def test_a_request_held_open_does_not_stretch_the_stop_beyond_the_grace(
    tmp_path: Path,
    standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    """One request held on the fast path, one on aiohttp's (a chunked body, still
    coming): both share the one grace; aiohttp's did not get a second one after it."""
    grace = 2
    proxy = proxy_process(
        "--config", config_file(tmp_path, grace), "--upstream", standin_process.url
    )
    where = urlsplit(proxy.url)
    assert where.hostname is not None
    assert where.port is not None
    with (
        socket.create_connection((where.hostname, where.port)) as slow,
        socket.create_connection((where.hostname, where.port)) as chunked,
    ):
        head = (
            "POST /_api/version HTTP/1.1\r\nHost: x\r\nx-arango-async: store\r\n"
            f"Authorization: {ROOT['authorization']}\r\n"
        )
        slow.sendall(f"{head}Content-Length: 100\r\n\r\n0123456789".encode())  # 90 to come
        chunked.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        # The request is in its handler once the proxy has asked ArangoDB about the caller.
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                async with session.get(standin_process.url + "/_standin/counters") as resp:
                    if "GET /_db/_system/_api/version" in (await resp.json())["executed"]:
                        break
                await asyncio.sleep(0.01)
        # body_timeout is 60 s: only the grace can end this stop in time.
        began = time.monotonic()
        code = await asyncio.to_thread(proxy.stop, timeout=20)
        took = time.monotonic() - began
        assert code == 0, "".join(proxy.output)
        assert took < grace * 1.75, took  # twice the grace before
        for held in (slow, chunked):
            held.settimeout(5)
            assert held.recv(4096) == b""  # closed without a 202: nothing was promised


@pytest.mark.parametrize("chunked", [False, True])  # the fast path, aiohttp's
async def test_a_pass_through_request_cut_by_the_stop_gets_no_answer(
    tmp_path: Path,
    standin_process: StandInProcess,
    proxy_process: Callable[..., ProxyProcess],
    chunked: bool,
) -> None:
    """Past the grace, a request under way at ArangoDB is cut: the connection closes
    with no answer (it may have run), never a 503 saying ArangoDB was unreachable."""
    proxy = proxy_process("--config", config_file(tmp_path, 1), "--upstream", standin_process.url)
    where = urlsplit(proxy.url)
    assert where.hostname is not None
    assert where.port is not None
    body = b'{"query":"RETURN SLEEP(5)"}'
    with socket.create_connection((where.hostname, where.port)) as held:
        if chunked:
            chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            framing = b"Transfer-Encoding: chunked\r\n\r\n" + chunk
        else:
            framing = f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        held.sendall(
            f"POST /_api/cursor HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {ROOT['authorization']}\r\n".encode()
            + framing
        )
        await asyncio.sleep(0.5)  # at ArangoDB (the stand-in), sleeping
        code = await asyncio.to_thread(proxy.stop, timeout=20)
        assert code == 0, "".join(proxy.output)
        held.settimeout(5)
        assert held.recv(4096) == b""

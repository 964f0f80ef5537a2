"""The console command as a real process: start, log, serve, stop on signals."""

from __future__ import annotations

import asyncio
import base64
import errno
import gc
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy import cli
from proxy.cli import GC_THRESHOLD, run
from tests.processes import ProxyProcess, StandInProcess, free_port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_starts_serves_health_and_stops_cleanly(
    proxy_process: Callable[..., ProxyProcess], signum: int
) -> None:
    proc = proxy_process("--upstream", f"http://127.0.0.1:{free_port()}")
    assert len([line for line in proc.output if "listening on" in line]) == 1
    async with (
        aiohttp.ClientSession() as session,
        session.get(proc.url + "/_proxy/health") as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    assert proc.stop(signum) == 0
    assert "stopping" in proc.output[-1]


def test_reads_config_file(proxy_process: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n[log]\nlevel = "warning"\n')
    # --log-level overrides the file's warning, so the stop's info line shows.
    proc = proxy_process("--config", str(config), "--log-level", "info")
    assert proc.url == f"http://127.0.0.1:{port}"
    assert proc.stop() == 0
    assert "stopping" in proc.output[-1]


def test_the_listening_line_shows_whatever_the_log_level(
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    """design.md: it logs one line saying where it listens (outside checks read it)."""
    proc = proxy_process("--log-level", "error", "--listen", f"localhost:{free_port()}")
    assert proc.stop() == 0
    lines = "".join(proc.output).splitlines()
    [line] = [line for line in lines if "listening on" in line]
    assert "upstream http" in line
    assert not [line for line in lines if "stopping" in line]  # (info: hidden)


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "--listen",
                f"127.0.0.1:{port}",
                "--data",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr


def test_a_failure_to_start_other_than_listening_is_not_blamed_on_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An OSError on the way up that is not the listening socket's (the worker process
    cannot be started: too many open files) says what it is, not 'cannot serve on'."""

    def failing(config: object) -> None:  # (raises before run(): no loop, no gc tuning)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(cli, "serve", failing)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    assert cli.main(["--data", str(tmp_path / "d"), "--listen", "127.0.0.1:1"]) == 1
    [record] = [r for r in caplog.records if r.name == "arango_async_proxy"]
    assert record.getMessage() == "cannot start: [Errno 24] Too many open files"


def test_config_error_exits_1(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--listen", "nowhere", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "arango-async-proxy: config error: server.listen: expected HOST:PORT, got 'nowhere'"
    )


async def test_a_malformed_request_is_one_log_line_without_its_bytes(
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    """aiohttp would log it with a traceback at ERROR (a way to fill the log), and
    quote the line at fault in the log and in its answer: here, a password."""
    proc = proxy_process("--upstream", f"http://127.0.0.1:{free_port()}")
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    secret = base64.b64encode(b"alice:SECRETalicePW")
    answers = []
    for request in (
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + secret + b"\x01\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization Basic " + secret + b"\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        answers.append(await reader.read())
        writer.close()
    assert proc.stop() == 0
    logged = "".join(proc.output)
    assert "Traceback" not in logged
    assert secret.decode() not in logged
    lines = [line for line in logged.splitlines() if "malformed request" in line]
    assert len(lines) == 2
    assert all("WARNING" in line for line in lines)
    assert "refused: Invalid header value char" in lines[0]
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400"
        assert b"\r\nServer: ArangoDB" in head
        assert secret not in answer
        assert json.loads(body)["errorNum"] == 400


def start_on(data: Path) -> subprocess.CompletedProcess[str]:
    """Run the command on the data folder `data` until it exits (it should, at once)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_data_folder_others_can_write_exits_1(tmp_path: Path) -> None:
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o777)
    result = start_on(data)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()  # one line, no traceback, nothing unclosed
    assert line.endswith(
        f"ERROR arango_async_proxy: cannot open the job store: the data folder {data} is "
        f"writable by group or others (mode 0777); make it private, e.g. chmod 700 {data}"
    )
    assert not (data / "jobs.sqlite3").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"not a database at all, " * 200,
            "cannot open the job store {db}: file is not a database",
        ),
        (None, "{db} is an SQLite database that is not an arango-async-proxy job store"),
    ],
)
def test_a_damaged_or_foreign_database_stops_the_start_with_one_line(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = data / "jobs.sqlite3"
    if content is None:
        with sqlite3.connect(db) as other:
            other.execute("CREATE TABLE mine (x)")
        other.close()
    else:
        db.write_bytes(content)
    db.chmod(0o600)
    before = db.read_bytes()
    result = start_on(data)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ERROR" in lines[0]
    assert message.format(db=db) in lines[0]
    assert db.read_bytes() == before  # never reset, never touched


def test_the_proxy_runs_with_the_collector_tuned_for_a_server() -> None:
    """Both processes (the worker process too) start their loop through run()."""
    seen: list[tuple[tuple[int, int, int], int]] = []

    async def look() -> None:
        seen.append((gc.get_threshold(), gc.get_freeze_count()))

    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    try:
        run(look())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    [(threshold, frozen)] = seen
    assert threshold == GC_THRESHOLD != before
    assert frozen > 10_000  # the imported modules' objects, out of the collector's sight


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_starting_stops_it_in_order_once_started(
    tmp_path: Path, signum: int
) -> None:
    """The store's folder exists as soon as the start opens it, well before the proxy
    listens: a signal then is a stop in order (exit 0, no traceback), not a kill."""
    data = tmp_path / "data"
    command = [sys.executable, "-m", "proxy", "--listen", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(
        [*command, "--data", str(data), "--upstream", "http://127.0.0.1:9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(20_000):
            if (data / "jobs.sqlite3").exists():
                break
            time.sleep(0.0005)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    assert "stopping" in output


async def test_a_second_signal_during_the_stop_exits_at_once_and_loses_nothing(
    tmp_path: Path, proxy_process: Callable[..., ProxyProcess]
) -> None:
    """The stop waits for a request held open (up to a 60 s grace here); a second
    SIGTERM ends it at once, exit 1, unless it comes right after the first (as GNU
    timeout sends two: to the process, then to its group). The job answered 202
    before is there after a restart on the same data."""
    standin = StandInProcess.start("--no-auth")
    try:
        config = tmp_path / "proxy.toml"
        config.write_text("[server]\nshutdown_grace = 60\n")
        data = tmp_path / "data"
        args = ("--config", str(config), "--upstream", standin.url)
        proxy = proxy_process(*args, data=data)
        async with aiohttp.ClientSession() as session:
            async with session.put(
                proxy.url + "/_api/version", headers={"x-arango-async": "store"}
            ) as resp:
                assert resp.status == 202
                job_id = resp.headers["x-arango-async-id"]
            host, port = proxy.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as held:
                held.sendall(
                    b"PUT /_api/version HTTP/1.1\r\nHost: x\r\nx-arango-async: store\r\n"
                    b"Content-Length: 100\r\n\r\n0123456789"  # 90 bytes to come, never
                )
                await asyncio.sleep(0.3)  # (the request is under way)
                proxy.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)  # (sent at once, two signals may merge into one)
                proxy.proc.send_signal(signal.SIGTERM)  # the same stop, asked for twice
                await asyncio.sleep(1)
                assert proxy.proc.poll() is None  # stopping in order: waits for the request
                began = time.monotonic()
                assert await asyncio.to_thread(proxy.stop, signal.SIGTERM, 20) == 1
                assert time.monotonic() - began < 5
            output = "".join(proxy.output)
            assert "stopping" in output
            assert "SIGTERM during the stop: exiting at once" in output
            proxy = proxy_process(*args, data=data)
            for _ in range(200):
                async with session.put(f"{proxy.url}/_api/job/{job_id}") as resp:
                    if resp.status != 204:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 200
            assert resp.headers["x-arango-async-id"] == job_id
            assert proxy.stop() == 0
    finally:
        standin.kill()

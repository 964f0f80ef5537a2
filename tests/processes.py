"""Real processes for tests and benchmarks: the proxy's own command and the stand-in.

Both print one "listening on http(s)://HOST:PORT" line when they serve; `start`
waits for it. Crash tests use `kill()` (SIGKILL) and start again on the same data.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

LISTENING = re.compile(r"listening on (https?://[^\s,]+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)

    @classmethod
    def run(
        cls,
        command: list[str],
        timeout: float = 15.0,
        *,
        new_session: bool = False,
        cwd: Path | None = None,
    ) -> Self:
        """Start `command` and wait for its 'listening on' line; with `new_session`,
        in a process group of its own (as a service manager or a shell starts it); in
        `cwd` if given."""
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=new_session,
        )
        # Read the pipe's own bytes: a buffered readline() could hold lines that
        # communicate() (which reads the pipe itself) would then never see.
        output: list[str] = []
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        url = None
        while url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 65536).decode(errors="replace")
                if not chunk:
                    break
                output.append(chunk)
                text = "".join(output)
                match = LISTENING.search(text[: text.rfind("\n") + 1])  # whole lines
                if match:
                    url = match.group(1)
            elif proc.poll() is not None:
                break
        if url is not None:
            return cls(proc, url, output)
        proc.kill()
        rest = proc.communicate()[0]
        raise RuntimeError(f"{command} did not start: {''.join(output)}{rest}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.proc.send_signal(signum)
        rest, _ = self.proc.communicate(timeout=timeout)
        self.output.append(rest)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        if self.proc.returncode is not None:
            return  # already stopped and collected
        self.proc.kill()
        rest, _ = self.proc.communicate()
        self.output.append(rest)

    def peak_rss_kib(self) -> int:
        """VmHWM: the most resident memory the process ever had."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1))


class ProxyProcess(ServerProcess):
    @classmethod
    def start(
        cls, *args: str, data: Path, new_session: bool = False, code: Path | None = None
    ) -> Self:
        """`python -m proxy --data DATA ARGS`, on a free port unless ARGS say otherwise;
        `code`: a folder holding another tree of the proxy's code, run instead of this
        one (bench/ab.py)."""
        command = [sys.executable, "-m", "proxy", "--data", str(data), *args]
        if "--listen" not in args and "--config" not in args:
            command += ["--listen", f"127.0.0.1:{free_port()}"]
        return cls.run(command, new_session=new_session, cwd=code)

    def children(self) -> list[int]:
        """Its child processes (the worker process)."""
        pid = self.proc.pid
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class StandInProcess(ServerProcess):
    @classmethod
    def start(cls, *args: str) -> Self:
        """`python -m tests.standin ARGS` on a free port."""
        command = [sys.executable, "-m", "tests.standin", "--host", "127.0.0.1", "--port", "0"]
        return cls.run([*command, *args])

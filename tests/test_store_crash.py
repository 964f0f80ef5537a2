"""A real crash: a process accepting jobs is killed with SIGKILL; every id it reported survives."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

from storage import JobStore
from tests.test_store import new_job

ROOT = Path(__file__).resolve().parents[1]

# Accepts jobs in concurrent bursts, as the intake does, and prints each id the moment
# accept() returns it: a printed id is one a client was told about.
ACCEPTOR = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from storage import JobMode, JobStore, NewJob

    async def main() -> None:
        store = await JobStore.open(Path(sys.argv[1]))
        print("open", flush=True)

        async def one(n: int) -> None:
            job = NewJob(JobMode.STORE, "u", "_system", "POST", "/_api/cursor", (),
                         "Basic eDp5", b"x" * (n * 97 % 5000), 1.0)
            print(await store.accept(job), flush=True)

        n = 0
        while True:
            await asyncio.gather(*(one(n + i) for i in range(25)))
            n += 25

    asyncio.run(main())
    """
)


async def test_every_reported_id_survives_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ACCEPTOR,
        str(data),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    try:
        assert await child.stdout.readline() == b"open\n"
        reported = [int(await child.stdout.readline()) for _ in range(500)]
        child.send_signal(signal.SIGKILL)  # mid-run: accepts are in flight right now
        reported += [int(line) for line in (await child.stdout.read()).split()]
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    # 255: asyncio's child watcher can miss the status of a child killed this
    # early ("Unknown child process pid"); the kill was ours either way.
    assert child.returncode in (-signal.SIGKILL, 255)

    store = await JobStore.open(data)
    try:
        stored = await store.list_ids(done=False, viewer=None, limit=10**9)
        assert set(reported) <= set(stored)
        assert len(reported) == len(set(reported))
        job = await store.get(reported[-1], "u")
        assert job is not None
        assert (job.auth, len(job.body)) == ("Basic eDp5", (job.id - 1) * 97 % 5000)
        assert store.unfinished == len(stored)
        # New ids continue after everything the dead process may have handed out.
        assert await store.accept(new_job()) > max(stored)
    finally:
        await store.close()

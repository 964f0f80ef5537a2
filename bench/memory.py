"""Memory: results wait on disk, not in the proxy's memory.

    python bench/memory.py [--jobs 4000] [--size 16384]

Submits `--jobs` store jobs whose results are about `--size` bytes each (a
document insert with returnNew), waits until the proxy has harvested every
result, and prints the proxy's resident memory before and after next to the
bytes of results it holds, measured in the same run. Then fetches them all.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
from pathlib import Path

import aiohttp
from common import ProxyProcess, StandInProcess


def rss_mib(proxy: ProxyProcess) -> float:
    status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) / 1024


async def submit_all(base: str, jobs: int, size: int) -> tuple[list[str], int]:
    document = {"payload": "x" * size}
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/_api/collection", json={"name": "bench"}) as resp:
            assert resp.status == 200, resp.status
        semaphore = asyncio.Semaphore(32)

        async def one() -> None:
            async with (
                semaphore,
                session.post(
                    base + "/_api/document/bench?returnNew=true",
                    json=document,
                    headers={"x-arango-async": "store"},
                ) as resp,
            ):
                assert resp.status == 202, resp.status
                ids.append(resp.headers["x-arango-async-id"])

        await asyncio.gather(*(one() for _ in range(jobs)))
        while True:  # until every result is harvested into the proxy's store
            async with session.get(base + f"/_api/job/pending?count={jobs}") as resp:
                if not await resp.json():
                    break
            await asyncio.sleep(0.2)
    return ids, jobs * size


async def fetch_all(base: str, ids: list[str]) -> int:
    fetched = 0
    async with aiohttp.ClientSession() as session:
        for job_id in ids:
            async with session.put(base + f"/_api/job/{job_id}") as resp:
                assert resp.status == 202, resp.status  # the insert's own status, replayed
                fetched += len(await resp.read())
    return fetched


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--size", type=int, default=16384)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        standin = StandInProcess.start("--no-auth", "--workers", "4", "--queue-size", "4096")
        proxy = ProxyProcess.start("--upstream", standin.url, data=Path(tmp) / "data")
        try:
            before = rss_mib(proxy)
            ids, payload = await submit_all(proxy.url, args.jobs, args.size)
            held = rss_mib(proxy)
            database = sum(f.stat().st_size for f in (Path(tmp) / "data").iterdir()) / 2**20
            fetched = await fetch_all(proxy.url, ids)
            after = rss_mib(proxy)
        finally:
            proxy.stop()
            standin.stop()
    stored = payload / 2**20
    print(f"{args.jobs} unfetched results of ~{args.size} bytes each")
    print(f"{'results held by the proxy':<34} {stored:8.1f} MiB (data folder {database:.1f} MiB)")
    print(f"{'proxy RSS before / holding / after':<34} {before:.1f} / {held:.1f} / {after:.1f} MiB")
    print(f"ratio RSS growth / results held: {(held - before) / stored:.2f}")
    print(f"fetched {fetched / 2**20:.1f} MiB of results")


if __name__ == "__main__":
    asyncio.run(main())

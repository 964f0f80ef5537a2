"""End to end: accept → ArangoDB → harvest → client fetch, against the stand-in direct.

    python bench/e2e.py [--clients 16] [--seconds 5]

Each client submits a `store` job (`GET /_api/version`), asks for its result
with `PUT /_api/job/{id}` every 2 ms until it is there, and starts over. The
same loop runs direct against the stand-in and through the proxy in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp
from common import Load, ProxyProcess, StandInProcess, closed_loop


async def jobs_per_second(base: str, clients: int, seconds: float) -> Load:
    async def one_job(session: aiohttp.ClientSession) -> None:
        async with session.put(base + "/_api/version", headers={"x-arango-async": "store"}) as resp:
            await resp.read()
            assert resp.status == 202, resp.status
            job_id = resp.headers["x-arango-async-id"]
        while True:
            async with session.put(base + f"/_api/job/{job_id}") as resp:
                await resp.read()
                if "x-arango-async-id" in resp.headers:
                    assert resp.status == 200, resp.status
                    return
                assert resp.status == 204, resp.status
            await asyncio.sleep(0.002)

    await closed_loop(one_job, clients=clients, seconds=1.0)  # warm-up
    return await closed_loop(one_job, clients=clients, seconds=seconds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        standin = StandInProcess.start("--no-auth", "--workers", "4", "--queue-size", "4096")
        proxy = ProxyProcess.start("--upstream", standin.url, data=Path(tmp) / "data")
        try:
            direct = await jobs_per_second(standin.url, args.clients, args.seconds)
            through = await jobs_per_second(proxy.url, args.clients, args.seconds)
        finally:
            proxy.stop()
            standin.stop()
    print(f"end-to-end store jobs, {args.clients} concurrent clients, {args.seconds:.0f} s each")
    print(direct.row("direct to stand-in"))
    print(through.row("through the proxy"))
    print(f"ratio proxy/direct jobs/s: {through.rate / direct.rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())

"""The framework's ceiling: an aiohttp server (uvloop, as the proxy runs) whose one
handler answers 202 with nothing else to do. bench/accept.py measures it in the
same run, so the accept figure can be read against what aiohttp itself serves.

    python bench/bare.py PORT
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web


async def accepted(_request: web.Request) -> web.Response:
    return web.Response(status=202, headers={"Content-Type": "text/plain"})


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", accepted)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()  # until the benchmark stops us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()

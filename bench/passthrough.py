"""Pass-through overhead: small JSON responses direct to the stand-in and through the proxy.

    python bench/passthrough.py [--clients 16] [--seconds 5]

Prints requests/s and p50/p99 latency for both, measured in the same run,
and their ratio. The load generator, the proxy and the stand-in share the
machine's cores, so absolute numbers mean little; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from common import Load, ProxyProcess, StandInProcess, load


async def measure(url: str, clients: int, seconds: float) -> Load:
    return await load(
        url + "/_api/version",
        method="GET",
        headers={},
        expect=200,
        clients=clients,
        seconds=seconds,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        standin = StandInProcess.start("--no-auth")
        proxy = ProxyProcess.start("--upstream", standin.url, data=Path(tmp) / "data")
        try:
            direct = await measure(standin.url, args.clients, args.seconds)
            through = await measure(proxy.url, args.clients, args.seconds)
        finally:
            proxy.stop()
            standin.stop()
    print(f"GET /_api/version, {args.clients} concurrent clients, {args.seconds:.0f} s each")
    print(direct.row("direct to stand-in"))
    print(through.row("through the proxy"))
    print(
        f"ratio proxy/direct: throughput {through.rate / direct.rate:.2f}, "
        f"p50 latency {through.p50 / direct.p50:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())

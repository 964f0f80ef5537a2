"""Run the stand-in as a process; prints one `listening on http://HOST:PORT` line.

    python -m tests.standin --host 127.0.0.1 --port 0 [--no-auth]
        [--users root:,alice:alicepw] [--workers N] [--queue-size N] [--jwt-secret S]
        [--tls PEM] [--trusted-origin ORIGIN ...]

With `--tls PEM` (private key and certificate chain in one file) it serves
TLS only and prints an https:// URL.

Stops cleanly (exit 0) on SIGTERM or SIGINT. Tests reach its state through the
`/_standin/restart`, `/_standin/queue-full`, `/_standin/outage?seconds=N` and
`/_standin/counters` endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

from tests.standin.server import DEFAULT_USERS, StandIn


def parse_users(text: str) -> dict[str, str]:
    """`root:,alice:alicepw` -> {"root": "", "alice": "alicepw"}."""
    users: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        name, colon, password = item.partition(":")
        if not name or not colon:
            raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {item!r}")
        users[name] = password
    return users


def tls_context(pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    return context


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-auth", action="store_true", help="accept every request")
    parser.add_argument("--users", type=parse_users, default=dict(DEFAULT_USERS))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--queue-size", type=int, default=128)
    parser.add_argument("--jwt-secret", default=None)
    parser.add_argument("--tls", metavar="PEM", help="key and certificate chain: serve TLS")
    parser.add_argument(
        "--trusted-origin",
        action="append",
        default=[],
        help="as ArangoDB's --http.trusted-origin (repeatable; * trusts all)",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    standin = StandIn(
        users=args.users,
        auth=not args.no_auth,
        workers=args.workers,
        queue_size=args.queue_size,
        jwt_secret=args.jwt_secret,
        ssl_context=tls_context(args.tls) if args.tls else None,
        trusted_origins=tuple(args.trusted_origin),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    url = await standin.start(args.host, args.port)
    print(f"listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pass-through: every request that is not an async job or the job API.

Method, raw path and query, end-to-end headers and body go to ArangoDB as
they came; status, reason, headers and body come back. Bodies are streamed
both ways in chunks, so a large upload or download never sits in memory.
Nothing is decompressed or re-encoded, so the reply is byte for byte ArangoDB's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import UpstreamFailure
from proxy.state import UPSTREAM
from proxy.upstream import end_to_end

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


def forwarded_headers(request: web.Request, drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """The request's end-to-end headers for ArangoDB, with X-Forwarded-* appended;
    without `drop` (lower case)."""
    return forwarded(
        request.headers.items(),
        peer=request.remote or "",
        secure=request.secure,
        host=request.host,
        drop=drop,
    )


def forwarded(
    received: Iterable[tuple[str, str]],
    *,
    peer: str,
    secure: bool,
    host: str | None,
    drop: tuple[str, ...] = (),
) -> CIMultiDict[str]:
    """`forwarded_headers` from a request's parts: the `received` headers, the
    client's address (`peer`), whether it came over TLS, its Host header."""
    # (Expect: the proxy answers the expectation itself, and sends the body whole)
    headers = end_to_end(received, drop=("host", "expect", *drop))
    previous = headers.popall("X-Forwarded-For", [])
    headers["X-Forwarded-For"] = ", ".join([*previous, peer])
    if secure:
        # a TLS connection is proof of https: a client cannot claim otherwise
        headers["X-Forwarded-Proto"] = "https"
    else:
        # a plain hop may sit behind a TLS-terminating balancer that said https
        headers.setdefault("X-Forwarded-Proto", "http")
    if host:
        headers.setdefault("X-Forwarded-Host", host)
    return headers


async def passthrough(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    data = request.content if request.body_exists else None
    try:
        async with upstream.stream(
            request.method, request.raw_path, forwarded_headers(request), data
        ) as reply:
            response = web.StreamResponse(status=reply.status, reason=reply.reason)
            response.headers.extend(end_to_end(reply.headers.items()))
            await response.prepare(request)
            try:
                async for chunk in reply.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except ConnectionError:
                # (writing to the client: reset, or gone while draining)
                return response  # the client left: read no further, as the fast path
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The status line is already sent: the only honest signal left
                # is to cut the connection, so the client sees a short body.
                log.warning("upstream broke off %s %s: %r", request.method, request.path, exc)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response
    except UpstreamFailure as failure:
        return failure.response()

"""Pass-through on the fast path: a request that is neither an async submission nor
for the job API goes to ArangoDB as `proxy.passthrough` sends it, and the reply is
streamed back as aiohttp's path frames it (its own length, or chunked), byte for
byte, to a `Sink`: the client connection (`proxy.fastpath.FastPath`)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Protocol

import aiohttp
from aiohttp import web

from proxy.errors import UpstreamFailure
from proxy.fastpath_http import Submission, stream_head
from proxy.passthrough import CHUNK, forwarded
from proxy.state import UPSTREAM
from proxy.upstream import end_to_end

log = logging.getLogger(__name__)


class Sink(Protocol):
    @property
    def closed(self) -> bool:
        """The client has left."""

    def write(self, data: bytes) -> None: ...

    def answer_with(self, submission: Submission, response: web.Response, *, close: bool) -> None:
        """Write `response`, whole, as the answer to `submission`."""

    def write_head(self, data: bytes) -> None:
        """Write a streamed answer's head: from now on no other answer can be sent."""

    async def drain(self) -> None:
        """Until the client has read enough of what was written."""


def _reason(reply: aiohttp.ClientResponse) -> str:
    """ArangoDB's reason phrase; the standard one if it sent none (as aiohttp's path)."""
    if reply.reason is not None:
        return reply.reason
    try:
        return HTTPStatus(reply.status).phrase
    except ValueError:
        return ""


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def relay(
    app: web.Application,
    submission: Submission,
    sink: Sink,
    *,
    peer: str,
    secure: bool,
    close: bool,
) -> bool:
    """As `proxy.passthrough` answers; True when the connection must close (`close`
    says whether it closes after the answer anyway)."""
    headers = forwarded(submission.headers, peer=peer, secure=secure, host=submission.host)
    data = submission.body if submission.length else None
    try:
        async with app[UPSTREAM].stream(
            submission.method, submission.target, headers, data
        ) as reply:
            head, length = stream_head(
                reply.status,
                _reason(reply),
                end_to_end(reply.headers.items()),
                close=close,
                head=submission.head,
            )
            sink.write_head(head)
            if length == 0:
                return close
            try:
                async for chunk in reply.content.iter_chunked(CHUNK):
                    if sink.closed:
                        return True  # the client left: read no further
                    sink.write(chunk if length is not None else _chunk(chunk))
                    await sink.drain()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The status line is already sent: cut the connection, as aiohttp's path.
                log.warning(
                    "upstream broke off %s %s: %r", submission.method, submission.target, exc
                )
                return True
            if length is None:
                sink.write(b"0\r\n\r\n")
            return close
    except UpstreamFailure as failure:
        sink.answer_with(submission, failure.response(), close=close)
        return close

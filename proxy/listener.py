"""The proxy's listening socket: every connection starts on the fast path
(`proxy.fastpath`), which hands to aiohttp what it does not take; aiohttp's
protocol here refuses malformed requests in ArangoDB's shape, without quoting them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.app import runner_options
from proxy.config import MAX_HEADER_FIELDS
from proxy.errors import (
    ERROR_BAD_PARAMETER,
    ERROR_HEADERS_TOO_LARGE,
    arango_error,
    headers_too_large,
)
from proxy.fastpath import FastFront
from proxy.state import CONFIG, SHUTDOWN

log = logging.getLogger(__name__)

# the parser's refusals whose message is, or quotes, the request's own bytes
_FIXED_REASONS = (
    (InvalidURLError, "invalid request target"),
    (LineTooLong, "a line of the request is too long"),
)
_PLAIN_REASON = re.compile(r"[A-Za-z][A-Za-z -]{0,79}")
_TOO_MANY_FIELDS = "Too many headers received"  # (aiohttp's parsers' own words)


def refusal_reason(exc: HttpProcessingError) -> str:
    """What aiohttp's parser found wrong, never a byte of the request: its messages
    quote the line at fault ("Invalid header value char:\n\n  b'<the line>'"), or
    are that line. Only a message's plain words before any colon are kept."""
    for kind, reason in _FIXED_REASONS:
        if isinstance(exc, kind):
            return reason
    words = exc.message.split(":", 1)[0].strip()
    return words if _PLAIN_REASON.fullmatch(words) else "not valid HTTP"


class _ArangoShapedRefusals(RequestHandler):
    """aiohttp's protocol, but a request its parser refuses gets a 400 in ArangoDB's
    error shape and one WARNING line, neither of which holds the request's bytes;
    a 431 for a header field over `field_limit` (server.max_header_size) or more
    than MAX_HEADER_FIELDS fields, as proxy.app answers oversize headers.

    aiohttp answers it text/plain with the parser's message, which quotes the line
    at fault (an Authorization header, say), and logs that message at ERROR with a
    traceback: a client's password in the proxy's log, and a way to fill it."""

    __slots__ = ("_field_limit",)

    def __init__(self, *args: Any, field_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._field_limit = field_limit

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = refusal_reason(exc)
        log.warning("malformed request from %s refused: %s", request.remote, reason)
        if isinstance(exc, LineTooLong) and exc.args[1:2] == (self._field_limit,):
            # (a field the parser would not hold; the request line's limit is another)
            response = headers_too_large(self._field_limit)
        elif exc.message == _TOO_MANY_FIELDS:
            response = arango_error(
                431, ERROR_HEADERS_TOO_LARGE, f"more than {MAX_HEADER_FIELDS} header fields"
            )
        else:
            response = arango_error(status, ERROR_BAD_PARAMETER, f"malformed request: {reason}")
        response.headers["Server"] = "ArangoDB"  # (the proxy's answers carry ArangoDB's)
        response.force_close()
        return response


class ListenError(OSError):
    """The listening socket could not be opened (address in use, not available, ...)."""


class Listener:
    """The proxy's listening socket and the aiohttp runner behind it; every
    connection starts on the fast path."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None) -> None:
        self.app = app
        self._ssl = ssl_context
        self._runner = web.AppRunner(app, handle_signals=False, **runner_options(app[CONFIG]))
        self._server: asyncio.Server | None = None
        self._front: FastFront | None = None

    async def start(self) -> None:
        """Start the application (store, dispatcher, ...), then listen. A failure on
        the way closes what was started (`stop` need not be called)."""
        try:
            await self._runner.setup()
            server = self._runner.server
            assert server is not None
            loop = asyncio.get_running_loop()
            field_limit = self.app[CONFIG].server.max_header_size

            def aiohttp_protocol() -> RequestHandler:
                # as server() makes its protocol, with the options the runner gave it
                return _ArangoShapedRefusals(
                    server, loop=loop, field_limit=field_limit, **server._kwargs
                )

            self._front = FastFront(self.app, aiohttp_protocol, secure=self._ssl is not None)
            config = self.app[CONFIG].server
            try:
                self._server = await loop.create_server(
                    self._front, config.host, config.port, ssl=self._ssl, backlog=128
                )
            except OSError as exc:
                raise ListenError(exc.errno, exc.strerror or str(exc)) from exc
        except BaseException:
            await self._runner.cleanup()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self._server is not None
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def stop(self) -> None:
        """Stop listening, let requests under way finish within server.shutdown_grace,
        then stop the application (see `proxy.app`)."""
        if self._server is not None and self._front is not None:
            self._server.close()
            clock = self.app[SHUTDOWN]
            clock.begin()  # the grace counts from here, as from aiohttp's own stop
            await self._front.shutdown(clock.remaining())
            # aiohttp's connections (handed over) get what is left of the same grace,
            # not a grace of their own after it (aiohttp reads this at cleanup; it has
            # no public way to change it once the runner exists). Never 0: to aiohttp
            # that is no time limit at all.
            self._runner._shutdown_timeout = max(clock.remaining(), 0.01)
        await self._runner.cleanup()

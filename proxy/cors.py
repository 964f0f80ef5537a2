"""CORS headers on the proxy's own answers, as ArangoDB adds them.

ArangoDB adds three headers to every answer to a request with an ``Origin``
(``CommTask::finishExecution``), each only if the answer has none yet: the
origin itself as ``access-control-allow-origin``; ``access-control-allow-credentials``,
"true" only for an origin its ``--http.trusted-origin`` lists (or all, for
"*"); and ``access-control-expose-headers``, the headers a browser may read
(``x-arango-async-id`` among them, so a web page can learn its job's id). The
proxy's own answers (202s, the job facade's, replayed results, its errors) get
the same; passed-through answers have ArangoDB's own.

The proxy does not read ArangoDB's configuration: it asks ArangoDB how it
answers each origin, with the request that needs no credentials and runs no
handler, a CORS preflight (``OPTIONS /_api/version`` with the origin), and
remembers the answer for ``jobs.auth_cache_ttl`` seconds (ArangoDB reads the
option at start-up only); once that has passed, the answer stands while ArangoDB
is asked again. Concurrent questions about one origin share one request. An
origin ArangoDB has not yet answered about waits for it a second at most (an
accepted job's 202 never waits longer), then gets "false" (ArangoDB's default,
trusting no origin); when ArangoDB gives no answer (down, or too slow), what it
said last stands, or else "false", for RETRY_AFTER seconds before it is asked
again: while it is down no answer waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import MutableMapping

from multidict import CIMultiDict

from proxy.errors import UpstreamFailure
from proxy.upstream import Upstream

ALLOW_ORIGIN = "access-control-allow-origin"
ALLOW_CREDENTIALS = "access-control-allow-credentials"
EXPOSE_HEADERS = "access-control-expose-headers"
CORS_HEADERS = (ALLOW_ORIGIN, ALLOW_CREDENTIALS, EXPOSE_HEADERS)
# StaticStrings::ExposedCorsHeaders
EXPOSED = (
    "etag, content-encoding, content-length, location, server, x-arango-errors, x-arango-async-id"
)
# the longest an answer waits for ArangoDB to say whether it trusts an origin
ASK_WAIT = 1.0
# how long what stands for an origin is kept when ArangoDB gave no answer about it
RETRY_AFTER = 5.0

log = logging.getLogger(__name__)


class Origins:
    """Whether ArangoDB allows credentials from each origin, as ArangoDB says."""

    def __init__(self, upstream: Upstream, ttl: float, max_entries: int = 1000) -> None:
        self._upstream = upstream
        self._ttl = ttl
        self._max_entries = max_entries
        # origin -> (expiry, allowed)
        self._known: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._asking: dict[str, asyncio.Task[bool]] = {}

    async def apply(self, origin: str, headers: MutableMapping[str, str]) -> None:
        """Add the CORS headers for a request from `origin` (not empty) to `headers`
        of an answer, as ArangoDB does: none that is there already."""
        headers.setdefault(ALLOW_ORIGIN, origin)
        if ALLOW_CREDENTIALS not in headers:
            allowed = await self.allows_credentials(origin)
            headers[ALLOW_CREDENTIALS] = "true" if allowed else "false"
        headers.setdefault(EXPOSE_HEADERS, EXPOSED)

    async def allows_credentials(self, origin: str) -> bool:
        known = self._known.get(origin)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        task = self._asking.get(origin)
        if task is None:
            task = asyncio.create_task(self._ask(origin), name="cors-origin")
            self._asking[origin] = task
            task.add_done_callback(lambda _: self._asking.pop(origin, None))
        if known is not None:
            return known[1]  # (while ArangoDB is asked again)
        allowed = False
        with contextlib.suppress(TimeoutError):
            allowed = await asyncio.wait_for(asyncio.shield(task), ASK_WAIT)
        return allowed

    async def _ask(self, origin: str) -> bool:
        """ArangoDB's answer for `origin`, remembered (see the module's doc)."""
        value = None
        try:
            reply = await self._upstream.call(
                "OPTIONS", "/_api/version", CIMultiDict({"Origin": origin})
            )
            if reply.status == 200:
                value = reply.headers.get(ALLOW_CREDENTIALS)
        except UpstreamFailure as failure:
            log.debug("cannot ask ArangoDB about origin %r: %s", origin, failure.message)
        except Exception:
            log.exception("asking ArangoDB about origin %r failed", origin)
        if value is None:
            known = self._known.get(origin)
            allowed = known is not None and known[1]
            self._remember(origin, allowed, RETRY_AFTER)
        else:
            allowed = value == "true"
            self._remember(origin, allowed, self._ttl)
        return allowed

    def _remember(self, origin: str, allowed: bool, lifetime: float) -> None:
        self._known[origin] = (time.monotonic() + lifetime, allowed)
        self._known.move_to_end(origin)
        while len(self._known) > self._max_entries:
            self._known.popitem(last=False)

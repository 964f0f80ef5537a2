"""The connection to ArangoDB: two connection pools and the header rules.

Everything that talks to ArangoDB (pass-through, credential checks,
dispatcher, harvester) goes through `Upstream`, so transport errors are
mapped to ArangoDB-shaped errors in one place (`proxy.errors`). `stream`
(pass-through) uses an aiohttp session; `call`, a whole exchange, uses the
lean client of `proxy.http1` (HEAD excepted). For an https:// upstream both
verify ArangoDB's certificate with the one TLS context built in `__init__`
(`proxy.tls`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import upstream_failure
from proxy.http1 import Http1Pool
from proxy.tls import client_context
from storage.records import frozen

# RFC 9110 §7.6.1 plus the non-standard ones proxies traditionally drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

MAX_FIELD = 1024 * 1024  # bytes of one header field (or the status line) from ArangoDB

# Headers aiohttp's client would add on its own; a proxy must not invent them.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def end_to_end(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """Copy `headers` without hop-by-hop ones, those named in Connection, and `drop`.
    A name repeated in another case is spelt as it came first: aiohttp's client keeps
    only the last of fields whose names differ in case alone."""
    spelling: dict[str, str] = {}
    pairs = [
        (lower, spelling.setdefault(lower, name), value)
        for name, value in headers
        for lower in (name.lower(),)
    ]
    skip = _skipping(tuple(drop))
    named = [value for lower, _, value in pairs if lower == "connection"]
    if named:
        skip = skip | {token.strip().lower() for value in named for token in value.split(",")}
    return CIMultiDict([(name, value) for lower, name, value in pairs if lower not in skip])


@functools.cache
def _skipping(drop: tuple[str, ...]) -> frozenset[str]:
    """HOP_BY_HOP and `drop`, lower-cased: built once per call site's constant."""
    return HOP_BY_HOP | {name.lower() for name in drop}


@frozen
class Reply:
    """A complete (non-streamed) upstream response."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_num(self) -> int | None:
        """ArangoDB's errorNum, or None when the body is not ArangoDB's error."""
        try:
            error_num = self.json().get("errorNum")
        except (ValueError, AttributeError):
            return None
        return error_num if isinstance(error_num, int) else None


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        """Raises `ConfigError` when `upstream.ca_file` cannot be used."""
        self.config = config
        self.base = config.url.rstrip("/")
        self._ssl = client_context(config)
        self._session: aiohttp.ClientSession | None = None
        self._pool: Http1Pool | None = None

    async def start(self) -> None:
        url = URL(self.base)
        assert url.host is not None, "checked by the config"
        assert url.port is not None, "checked by the config"
        self._pool = Http1Pool(
            url.host,
            url.port,
            ssl_context=self._ssl,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.request_timeout,
            limit=self.config.pool_size,
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.config.connect_timeout,
            sock_read=self.config.request_timeout,
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.config.pool_size,
                ssl=True if self._ssl is None else self._ssl,
            ),
            timeout=timeout,
            auto_decompress=False,
            # as the lean client (proxy.http1), which has no limit of its own: the
            # same answer must not pass one way and be refused the other
            max_line_size=MAX_FIELD,
            max_field_size=MAX_FIELD,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, target: str) -> URL:
        """`target` is a raw path with its query, sent exactly as received."""
        return URL(self.base + target, encoded=True)

    @asynccontextmanager
    async def stream(
        self, method: str, target: str, headers: CIMultiDict[str], data: Any = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Open a request whose response body the caller streams.

        Failures before the response headers arrive raise `UpstreamFailure`.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        try:
            response = await self._session.request(
                method,
                self.url(target),
                headers=headers,
                data=data,
                allow_redirects=False,
                skip_auto_headers=_SKIP_AUTO,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise upstream_failure(exc, self.base) from exc
        try:
            yield response
        except BaseException:
            response.close()  # a half-read body must not go back to the pool
            raise
        response.release()

    async def call(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None = None
    ) -> Reply:
        """Send a request and read the whole response (`proxy.http1`; HEAD via aiohttp)."""
        if method == "HEAD":
            return await self._call_aiohttp(method, target, headers, body)
        assert self._pool is not None, "Upstream.start() was not awaited"
        try:
            status, reply_headers, payload = await self._pool.request(
                method, target, headers.items(), body
            )
        except (OSError, TimeoutError) as exc:
            raise upstream_failure(exc, self.base) from exc
        return Reply(status, CIMultiDictProxy(reply_headers), payload)

    async def _call_aiohttp(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None
    ) -> Reply:
        async with self.stream(method, target, headers, body) as response:
            try:
                payload = await response.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise upstream_failure(exc, self.base) from exc
            return Reply(response.status, response.headers, payload)

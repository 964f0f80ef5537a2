"""Who is calling, and does ArangoDB accept them for this database.

The user name is read from the Authorization header (Basic user, or a JWT's
``preferred_username``); no header, or a JWT without a user, is the
superuser ``""`` that sees every job, as in ArangoDB. Credentials the proxy
cannot read (no ``user:password``, not base64, not a JWT, another scheme) are
refused by an ArangoDB with authentication on; one with authentication off
ignores them and treats the request as one without credentials (the
superuser), so the proxy does the same once ArangoDB has accepted a request
without credentials too. The header itself is
trusted only after ArangoDB accepted it for the database: the proxy asks
``GET /_db/{db}/_api/version`` (ArangoDB answers 401/11 or 404/1228 before
running any handler) and remembers a positive answer for ``auth_cache_ttl``
seconds, keyed by a MAC (keyed BLAKE2b) of header and database under a per-process
random key, so the cache never holds a secret. Concurrent checks of the same new
credentials share one request. Failures are never cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from proxy.arango_headers import ArangoHeaders
from proxy.arango_request import header
from proxy.errors import (
    ERROR_FORBIDDEN,
    ERROR_SERVICE_UNAVAILABLE,
    UpstreamFailure,
    arango_error,
)
from proxy.upstream import Upstream
from storage.records import frozen

SYSTEM_DB = "_system"

# Headers of ArangoDB's refusal that the client should see unchanged.
_CHALLENGE = "WWW-Authenticate"
_RELAYED = ("Content-Type", _CHALLENGE)
# A request with this header (any value) gets no WWW-Authenticate with a 401.
OMIT_CHALLENGE = "x-omit-www-authenticate"


@frozen
class Caller:
    user: str  # "" is the superuser: no credentials, or a JWT without a user
    authorization: str | None
    database: str

    @property
    def viewer(self) -> str | None:
        """The user whose jobs this caller sees; None sees all (superuser)."""
        return self.user or None


_SLASHES = re.compile(r"//+")


def arango_path(raw_target: str) -> str:
    """The path of a raw request target as ArangoDB reads it (``HttpRequest::parseUrl``).

    ArangoDB collapses repeated slashes before it looks for ``/_db/{name}`` or
    a handler, so ``//_api//job/all`` is its job API; the query is cut off and
    nothing is decoded (``/_api/job%2Fall`` is not the job API).
    """
    return _SLASHES.sub("/", raw_target.partition("?")[0])


def database_of(raw_target: str) -> tuple[str, str]:
    """(decoded name, raw segment) of the database a raw target addresses."""
    prefix = database_prefix(raw_target)
    if prefix:
        raw = prefix[len("/_db/") :]
        return unquote(raw), raw
    return SYSTEM_DB, SYSTEM_DB


def database_prefix(raw_target: str) -> str:
    """The target's ``/_db/{name}`` (raw), or "" without one. A job's own requests to
    ArangoDB's job API (fetch, lists, cancel) go there: the job API needs read access
    to the database in the path, which the job's user was verified for, and maybe
    not for ``_system``."""
    path = arango_path(raw_target)
    if path.startswith("/_db/"):
        return "/_db/" + path[len("/_db/") :].split("/", 1)[0]
    return ""


def job_at_arangodb(raw_target: str, upstream_id: str) -> str:
    """ArangoDB's job API path for a job sent to `raw_target`, in its database."""
    return f"{database_prefix(raw_target)}/_api/job/{upstream_id}"


UNREADABLE = "\x00unreadable"  # the user of credentials the proxy cannot read


_BASE64_PREFIX = re.compile(r"[A-Za-z0-9+/]*")


def _arango_base64(text: str) -> bytes:
    """`text` decoded as ArangoDB decodes Basic credentials (StringUtils::decodeBase64):
    its base64 characters up to the first other one or '=', no padding needed, and
    a last group of 2 or 3 characters giving 1 or 2 bytes (of 1, none)."""
    prefix = _BASE64_PREFIX.match(text)
    chars = prefix.group(0) if prefix else ""
    whole = len(chars) - len(chars) % 4
    decoded = base64.b64decode(chars[:whole])
    rest = chars[whole:]
    if len(rest) >= 2:
        decoded += base64.b64decode(rest + "=" * (4 - len(rest)))[: len(rest) - 1]
    return decoded


def _claims(authorization: str | None) -> dict[str, Any] | None:
    """The claims of a Bearer JWT (not yet verified), or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    try:
        payload = token.strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, IndexError, UnicodeDecodeError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def _expires(authorization: str | None) -> float | None:
    """A Bearer JWT's `exp` claim (seconds since the epoch), or None."""
    claims = _claims(authorization)
    exp = claims.get("exp") if claims else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def user_of(authorization: str | None) -> str:
    """The user name an Authorization header claims (not yet verified), as ArangoDB
    reads it; UNREADABLE where ArangoDB finds no credentials in it."""
    if not authorization:
        return ""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            user, colon, _ = _arango_base64(credentials.strip()).decode().partition(":")
        except UnicodeDecodeError:
            return UNREADABLE
        return user if colon and user else UNREADABLE
    claims = _claims(authorization)
    if claims is None:
        return UNREADABLE
    name = claims.get("preferred_username", "")
    return name if isinstance(name, str) else ""


def allowed_paths(authorization: str | None) -> list[str] | None:
    """The paths a JWT limited by an ``allowed_paths`` claim may reach; None: no limit."""
    claims = _claims(authorization)
    if claims is None or "allowed_paths" not in claims:
        return None
    paths = claims["allowed_paths"]
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


def may_reach(paths: list[str], raw_target: str) -> bool:
    """Whether a token limited to `paths` may reach `raw_target`: its path listed with
    or without its ``/_db/{name}`` (``/_db/_system`` where it has none)."""
    path = arango_path(raw_target)
    prefix = database_prefix(raw_target)
    rest = path[len(prefix) :]
    return not {path, rest, f"{prefix or '/_db/' + SYSTEM_DB}{rest}"}.isdisjoint(paths)


_WWW_AUTHENTICATE = ('Basic, realm="ArangoDB"', 'Bearer, token_type="JWT", realm="ArangoDB"')


def _not_allowed(*, omit_challenge: bool) -> web.Response:
    """ArangoDB's 401 for credentials not good for the path."""
    refusal = arango_error(
        401, ERROR_FORBIDDEN, "not authorized to execute this request", handler=False
    )
    if not omit_challenge:
        for value in _WWW_AUTHENTICATE:
            refusal.headers.add(_CHALLENGE, value)
    return refusal


class Verifier:
    def __init__(self, upstream: Upstream, ttl: float, max_entries: int = 10_000) -> None:
        self._upstream = upstream
        # learnt from the replies to the checks (proxy.arango_headers)
        self.arango_headers = ArangoHeaders()
        self._ttl = ttl
        self._max_entries = max_entries
        self._key = os.urandom(32)
        # digest -> (expiry, user): the user known_caller gives (None: caller_of tells)
        self._verified: OrderedDict[bytes, tuple[float, str | None]] = OrderedDict()
        self._checking: dict[bytes, asyncio.Future[web.Response | None]] = {}

    def _digest(self, authorization: str | None, database: str) -> bytes:
        # (surrogateescape: a header that is not UTF-8 keeps its bytes, as sent on)
        material = f"{authorization or ''}\x00{database}".encode("utf-8", "surrogateescape")
        # keyed BLAKE2 is a MAC in one C call, several times cheaper than hmac.new
        return hashlib.blake2b(material, key=self._key, digest_size=32).digest()

    async def caller(self, request: web.Request) -> Caller | web.Response:
        """The verified caller of `request`, or the refusal to send back."""
        return await self.caller_of(
            header(request.headers, "Authorization"),
            request.raw_path,
            omit_challenge=OMIT_CHALLENGE in request.headers,
        )

    async def caller_of(
        self, authorization: str | None, raw_target: str, *, omit_challenge: bool = False
    ) -> Caller | web.Response:
        """The verified caller of a request to `raw_target`, or the refusal to send back
        (`omit_challenge`: the request has ``x-omit-www-authenticate``, so the refusal
        has no ``WWW-Authenticate``, as ArangoDB's)."""
        database, raw_database = database_of(raw_target)
        refusal = await self.verify(authorization, raw_database)
        if refusal is not None:
            # A copy for each request: checks of the same credentials at once share one
            # refusal, and aiohttp sends a response object once (a second send of it
            # writes nothing, and that client would wait for an answer for ever).
            kept = CIMultiDict(refusal.headers)
            if omit_challenge:
                kept.popall(_CHALLENGE, None)
            return web.Response(status=refusal.status, body=refusal.body, headers=kept)
        paths = allowed_paths(authorization)
        if paths is not None and not may_reach(paths, raw_target):
            # ArangoDB refuses a token on a path it is not allowed (before queueing);
            # the check with /_api/version above says nothing about this path
            return _not_allowed(omit_challenge=omit_challenge)
        user = user_of(authorization)
        if user == UNREADABLE and await self.verify(None, raw_database) is None:
            user = ""  # authentication is off: ArangoDB ignored them (see the module's doc)
        return Caller(user, authorization, database)

    def known_caller(self, authorization: str | None, raw_target: str) -> Caller | None:
        """`caller_of`, when its credentials are remembered as verified; else None."""
        database, raw_database = database_of(raw_target)
        digest = self._digest(authorization, raw_database)
        known = self._verified.get(digest)
        if known is None or known[0] <= time.monotonic() or known[1] is None:
            return None
        self._verified.move_to_end(digest)  # (see _known)
        return Caller(known[1], authorization, database)

    def _known(self, digest: bytes) -> bool:
        """Remembered and not expired. A use moves it to the end of the eviction order
        (not its expiry): a caller at work is not pushed out by a flood of new entries
        (ArangoDB takes endless spellings of one credential), and stays accepted while
        ArangoDB is down."""
        known = self._verified.get(digest)
        if known is None or known[0] <= time.monotonic():
            return False
        self._verified.move_to_end(digest)
        return True

    async def verify(self, authorization: str | None, raw_database: str) -> web.Response | None:
        digest = self._digest(authorization, raw_database)
        if self._known(digest):
            return None
        pending = self._checking.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[web.Response | None] = asyncio.get_running_loop().create_future()
        self._checking[digest] = future
        try:
            refusal = await self._ask(authorization, raw_database)
            future.set_result(refusal)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so no "never retrieved" warning
            raise
        finally:
            del self._checking[digest]
        if refusal is None:
            self._remember(digest, authorization)
        return refusal

    def _remember(self, digest: bytes, authorization: str | None) -> None:
        """For the TTL; a JWT no longer than its `exp` (ArangoDB refuses it after)."""
        lifetime = self._ttl
        expires = _expires(authorization)
        if expires is not None:
            lifetime = min(lifetime, expires - time.time())
        user: str | None = user_of(authorization)
        if user == UNREADABLE or allowed_paths(authorization) is not None:
            user = None  # (rare) caller_of tells
        self._verified[digest] = (time.monotonic() + lifetime, user)
        self._verified.move_to_end(digest)
        while len(self._verified) > self._max_entries:
            self._verified.popitem(last=False)

    async def _ask(self, authorization: str | None, raw_database: str) -> web.Response | None:
        headers: CIMultiDict[str] = CIMultiDict()
        if authorization is not None:
            headers["Authorization"] = authorization
        try:
            reply = await self._upstream.call("GET", f"/_db/{raw_database}/_api/version", headers)
        except UpstreamFailure as failure:
            return arango_error(
                503,
                ERROR_SERVICE_UNAVAILABLE,
                f"cannot verify credentials: {failure.message}",
                handler=False,
            )
        self.arango_headers.learn(reply.headers)
        if reply.status == 200:
            return None
        # ArangoDB's own refusal (401/11, 404/1228, 503 in maintenance, ...).
        relayed = CIMultiDict(
            (name, value) for name in _RELAYED for value in reply.headers.getall(name, ())
        )
        return web.Response(status=reply.status, body=reply.body, headers=relayed)

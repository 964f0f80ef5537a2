"""The credentials the proxy itself sends to ArangoDB for a job.

Everything the proxy sends on a job's behalf (dispatch, the done/pending lists,
fetching the result, cancel, abandoning a submission, lost-job checks) takes
its ``Authorization`` header from one of two `JobCredentials`::

    ClientCredentials (default)   the caller's own header, stored with the job
                                  until it is done, then wiped
    SignedTokens                  upstream.jwt_secret_file is set: nothing of the
                                  caller's is stored; each call carries a short-lived
                                  HS256 token the proxy signs for the job's user

Signed tokens are what ArangoDB itself accepts (``TokenCache``): header
``{"alg":"HS256","typ":"JWT"}``, claims ``iss: "arangodb"``, ``iat``, ``exp`` and
``preferred_username``, or for the superuser ``""`` a ``server_id`` instead of a
user (ArangoDB refuses a token with neither). The secret is read as ArangoDB
reads ``--server.jwt-secret-keyfile``: the file's bytes, trimmed of spaces, tabs
and line breaks. A token is signed once per user and reused until it is close to
expiry, so signing costs nothing on the hot path. Pass-through traffic and the
intake's credential check always use the caller's own header, untouched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDict

from proxy.auth import allowed_paths
from proxy.config import ConfigError

log = logging.getLogger(__name__)

TOKEN_LIFETIME = 600  # seconds a signed token is valid
TOKEN_RENEW_BEFORE = 120  # seconds before expiry a token is replaced
MAX_TOKENS = 10_000  # distinct users with a cached token; beyond it the cache starts over
SERVER_ID = "arango-async-proxy"
_WHITESPACE = b" \t\n\r"


def auth_headers(authorization: str | None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    if authorization is not None:
        headers["Authorization"] = authorization
    return headers


class JobCredentials(Protocol):
    def can_act_for(self, authorization: str | None) -> bool:
        """Whether jobs of this verified caller can be sent with these credentials."""

    def to_store(self, authorization: str | None) -> str | None:
        """What the job store keeps of a verified caller's Authorization header."""

    def headers(self, user: str, stored: str | None) -> CIMultiDict[str]:
        """The Authorization for a call to ArangoDB about a job of `user`."""


class ClientCredentials:
    """Replay the caller's own header (kept with the job only until it is done)."""

    def can_act_for(self, authorization: str | None) -> bool:
        return True

    def to_store(self, authorization: str | None) -> str | None:
        return authorization

    def headers(self, user: str, stored: str | None) -> CIMultiDict[str]:
        return auth_headers(stored)


class SignedTokens:
    """Sign a short-lived token for the job's user; store nothing of the caller's."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("the JWT secret must not be empty")
        self._secret = secret
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}  # user -> (header value, expiry)

    @classmethod
    def from_file(cls, path: str) -> SignedTokens:
        """Read ArangoDB's JWT secret; any problem is one ConfigError naming the setting."""
        setting = "upstream.jwt_secret_file"
        try:
            with open(path, "rb") as file:
                status = os.fstat(file.fileno())
                secret = file.read().strip(_WHITESPACE)
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
        if not secret:
            raise ConfigError(f"{setting}: {path} is empty; expected ArangoDB's JWT secret")
        if stat.S_IMODE(status.st_mode) & 0o077:
            log.warning("%s: %s can be read by others; chmod 600 it", setting, path)
        return cls(secret)

    def can_act_for(self, authorization: str | None) -> bool:
        # ArangoDB limits a token with allowed_paths to those paths; a token the
        # proxy signed would not be limited, so such a caller's jobs are refused.
        return allowed_paths(authorization) is None

    def to_store(self, authorization: str | None) -> str | None:
        return None

    def headers(self, user: str, stored: str | None) -> CIMultiDict[str]:
        return auth_headers("bearer " + self.token(user))

    def token(self, user: str) -> str:
        now = self._clock()
        cached = self._tokens.get(user)
        if cached is not None and cached[1] - now > TOKEN_RENEW_BEFORE:
            return cached[0]
        if len(self._tokens) >= MAX_TOKENS:
            self._tokens.clear()
        issued = int(now)
        claims: dict[str, object] = {"iss": "arangodb"}
        if user:
            claims["preferred_username"] = user
        else:
            claims["server_id"] = SERVER_ID  # ArangoDB's superuser token
        claims.update(iat=issued, exp=issued + TOKEN_LIFETIME)
        token = sign(self._secret, claims)
        self._tokens[user] = (token, issued + TOKEN_LIFETIME)
        return token


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _compact(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(secret: bytes, claims: dict[str, object]) -> str:
    """An HS256 JWT of `claims`, as ArangoDB verifies them."""
    signing_input = (
        f"{_b64url(_compact({'alg': 'HS256', 'typ': 'JWT'}))}.{_b64url(_compact(claims))}"
    )
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"

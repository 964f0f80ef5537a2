"""Who is calling: HTTP Basic against the user table, or an HS256 JWT.

Mirrors `CommTask::checkAuthHeader` and the token cache: the scheme name is
matched case-insensitively, anything unreadable is simply "not authenticated"
(the caller answers 401/11). `None` means not authenticated.

A JWT (`TokenCache::validateJwtHeader`/`validateJwtBody`) needs header
``{"alg":"HS256","typ":"JWT"}``, an HS256 signature with the server's secret,
``"iss":"arangodb"``, and either ``preferred_username`` (a non-empty string
naming an existing user) or ``server_id`` (a superuser token, no user); an
``exp``, if present, must be a number still in the future.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any

from tests.standin.call import Identity


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(secret: str, claims: dict[str, Any]) -> str:
    """An HS256 token as ArangoDB issues them (for tests and clients of the stand-in)."""

    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{part(signature)}"


class Authenticator:
    def __init__(self, users: dict[str, str], enabled: bool, jwt_secret: str | None) -> None:
        self.users = users
        self.enabled = enabled
        self.jwt_secret = jwt_secret

    def identify(self, header: str | None) -> Identity | None:
        if header is None:
            # auth off: the internal context, which is a superuser
            return None if self.enabled else Identity("", superuser=True)
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.lstrip(" ")
        if scheme.lower() == "basic":
            user = self._basic(credentials)
        elif scheme.lower() == "bearer":
            user = self._bearer(credentials)
        else:
            user = None
        if not self.enabled:
            # Anything goes; a readable user name still scopes the jobs (spec §8).
            return Identity(user or "", superuser=not user)
        if user is None:
            return None
        return Identity(user, superuser=user == "")

    def _basic(self, credentials: str) -> str | None:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except ValueError:  # not base64 (binascii.Error; not ASCII at all), not UTF-8
            return None
        name, colon, password = decoded.partition(":")
        if not colon:
            return None
        if self.enabled and (name not in self.users or self.users[name] != password):
            return None
        # an empty user name is never a superuser via Basic auth
        return name if name or not self.enabled else None

    def _bearer(self, token: str) -> str | None:
        """The token's user, "" for a superuser token, None if invalid."""
        if self.jwt_secret is None and self.enabled:
            return None
        try:
            head, body, signature = token.split(".")
            header = json.loads(_b64url(head))
            claims = json.loads(_b64url(body))
            raw_signature = _b64url(signature)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return None
        if header.get("alg") != "HS256" or header.get("typ") != "JWT":
            return None
        if self.jwt_secret is not None:
            expected = hmac.new(
                self.jwt_secret.encode(), f"{head}.{body}".encode(), hashlib.sha256
            ).digest()
            if not hmac.compare_digest(expected, raw_signature):
                return None
        # TokenCache::validateJwtBody: iss, then a user or a server_id, then exp
        if claims.get("iss") != "arangodb":
            return None
        if "preferred_username" in claims:
            user = claims["preferred_username"]
            if not isinstance(user, str) or not user:
                return None
            if self.enabled and user not in self.users:
                return None
        elif "server_id" in claims:
            user = ""  # a superuser token
        else:
            return None
        exp = claims.get("exp")
        if exp is not None and (
            not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= time.time()
        ):
            return None
        return user

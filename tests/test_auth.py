"""Who a caller is, and how verification with ArangoDB is cached."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.auth import database_of, user_of


def jwt(claims: dict[str, object]) -> str:
    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


@pytest.mark.parametrize(
    ("header", "user"),
    [
        (None, ""),
        ("", ""),
        ("Basic " + base64.b64encode(b"alice:pw:with:colons").decode(), "alice"),
        ("basic " + base64.b64encode(b"root:").decode(), "root"),
        ("Bearer " + jwt({"preferred_username": "bob", "iss": "arangodb"}), "bob"),
        ("bearer " + jwt({"iss": "arangodb", "server_id": "x"}), ""),  # superuser token
        ("bearer " + jwt({"preferred_username": 7}), ""),
        ("Basic !!!notbase64", "\x00unreadable"),
        ("Bearer not-a-jwt", "\x00unreadable"),
        ("Negotiate abc", "\x00unreadable"),
    ],
)
def test_user_of(header: str | None, user: str) -> None:
    assert user_of(header) == user


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/_api/version", ("_system", "_system")),
        ("/_db/shop/_api/job/1", ("shop", "shop")),
        ("/_db/my%20db/_api/job?x=1", ("my db", "my%20db")),
        ("/_db/only", ("only", "only")),
        ("/_db/q?x=/y", ("q", "q")),
        ("//_db//shop//_api/job", ("shop", "shop")),  # ArangoDB collapses slashes
    ],
)
def test_database_of(path: str, expected: tuple[str, str]) -> None:
    assert database_of(path) == expected

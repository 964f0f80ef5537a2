"""ArangoDB's standard response headers, on the answers the proxy makes itself.

ArangoDB adds a few headers to every response it sends (``CommTask``: its
product name, security and cache headers, the queue time), as configured
(``--http.hide-product-header``, ``--http.return-queue-time-header``). A
client that talks to the proxy's job facade, gets a 202 from its intake or one
of its errors should see them too. The proxy does not guess them: it copies
those ArangoDB sends from ArangoDB's own replies to its credential checks, the
latest one winning (the queue time changes). Until ArangoDB has answered once,
there are none. Passed-through answers carry ArangoDB's own, untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict

# In the order ArangoDB's `CommTask` adds them; names as it spells them.
NAMES = (
    "server",
    "x-content-type-options",
    "content-security-policy",
    "cache-control",
    "pragma",
    "expires",
    "strict-transport-security",
    "x-arango-queue-time-seconds",
)


# What `ArangoHeaders.lines` places itself.
_PLACED = (*NAMES, "connection")

# Set on every answer, whatever it has already (the others only if it has none).
_ALWAYS = frozenset({"server", "x-arango-queue-time-seconds"})


class ArangoHeaders:
    """The standard headers ArangoDB sent last; `apply` adds them to an answer."""

    def __init__(self) -> None:
        self.pairs: tuple[tuple[str, str], ...] = ()
        # (the server line, the others) as text, and encoded (for a 202 built on the
        # store's writer thread, read there in one go)
        self.lines: tuple[str, str] = ("", "")
        self.encoded: tuple[bytes, bytes] = (b"", b"")

    def learn(self, headers: Mapping[str, str]) -> None:
        """From a reply of ArangoDB's (any status)."""
        pairs = tuple((name, headers[name]) for name in NAMES if name in headers)
        if pairs != self.pairs:
            self.pairs = pairs
            lines = [f"{name}: {value}\r\n" for name, value in pairs]
            server = lines.pop(0) if pairs and pairs[0][0] == "server" else ""
            self.lines = (server, "".join(lines))
            self.encoded = (server.encode("latin-1"), self.lines[1].encode("latin-1"))

    def absent_from(self, headers: Mapping[str, str]) -> bool:
        """None of them in `headers`, nor aiohttp's Server or Connection: `lines` can
        go after them as they are."""
        return not any(name in headers for name in _PLACED)

    def apply(self, headers: CIMultiDict[str]) -> None:
        """As ArangoDB sends an answer: its server and queue time replace any there
        (the server in place: aiohttp's own, for the proxy's answers); the others
        are added if not there yet."""
        for name, value in self.pairs:
            if name in _ALWAYS:
                headers[name] = value
            else:
                headers.setdefault(name, value)

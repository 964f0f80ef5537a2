"""One request as a handler sees it, and ArangoDB's lenient value parsers.

A `Call` is complete in itself (the body is already read), so it can wait in
the job queue after the client's connection is gone.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes

from multidict import CIMultiDict, CIMultiDictProxy, istr

UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Identity:
    """Who sent a request, as the job manager's `authorized()` sees it."""

    user: str
    superuser: bool

    def may_see(self, owner: str) -> bool:
        return self.superuser or owner == self.user


@dataclass
class Call:
    method: str
    database: str
    path: str  # without the /_db/{name} prefix, still percent-encoded
    query: dict[str, str]  # as `query_values` reads the raw query string
    headers: CIMultiDictProxy[str]  # one value a field, as `last_fields` keeps them
    body: bytes
    identity: Identity
    target: str = ""  # the path as received, /_db prefix included (for StandIn.executed)
    suffixes: list[str] = field(default_factory=list)  # raw, after the handler's prefix
    # set when the job is cancelled: long-running handlers (AQL SLEEP) stop on it
    killed: asyncio.Event = field(default_factory=asyncio.Event)

    def suffix(self, index: int) -> str:
        return unquote(self.suffixes[index])

    def param(self, name: str) -> str | None:
        return self.query.get(name)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.param(name)
        return default if value is None else boolean(value)


def query_values(raw: str) -> dict[str, str]:
    """`HttpRequest::parseUrl`'s reading of a raw query string (after the `?`), step
    by step: in the name phase only `=` ends the name (an `&` is part of it); in the
    value phase `&` or the end of the string ends the value, and the name phase
    begins after it. A name still in its phase at the end, or an `=` that is the last
    character, stores nothing. `name[]` goes to the array values, not here.
    `setValue` overwrites: the last of repeated names counts. `urlDecode`: %XX and
    `+` as a space (a broken escape, which ArangoDB refuses, is kept)."""
    values: dict[str, str] = {}
    name_phase, name_start, name_end, value_start = True, 0, 0, 0
    position = 0
    while position < len(raw):
        char = raw[position]
        if name_phase:
            name_end = position
            if char == "=":
                name_phase, value_start = False, position + 1
            position += 1
            continue
        last = position + 1 == len(raw)
        if char == "&" or last or raw[position + 1] == "&":
            value_end = position if char == "&" else position + 1
            name = raw[name_start:name_end]
            if not (len(name) > 2 and name.endswith("[]")):
                values[_url_decoded(name)] = _url_decoded(raw[value_start:value_end])
            name_phase, name_start = True, value_end + 1
            position = value_end + 1
            continue
        position += 1
    return values


def _url_decoded(text: str) -> str:
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "surrogateescape")


def last_fields(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """The header fields as ArangoDB keeps them: one value a name, the last one sent
    (`HttpRequest::setHeader` overwrites)."""
    fields: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        fields[istr(name)] = value
    return CIMultiDictProxy(fields)


def uint64(text: str) -> int:
    """`StringUtils::uint64` (std::from_chars): leading digits; 0 if none or on overflow."""
    digits = ""
    for char in text:
        if not "0" <= char <= "9":
            break
        digits += char
    digits = digits.lstrip("0")
    if len(digits) > 20:  # overflow; and int() refuses strings beyond 4300 digits
        return 0
    value = int(digits) if digits else 0
    return value if value <= UINT64_MAX else 0


def double_decimal(text: str) -> float:
    """`StringUtils::doubleDecimal`: sign, digits with one '.', optional exponent; else 0."""
    pos, end = 0, len(text)
    sign = 1.0
    if pos < end and text[pos] in "+-":
        sign = -1.0 if text[pos] == "-" else 1.0
        pos += 1
    value, scale, seen_point = 0.0, 1.0, False
    while pos < end:
        char = text[pos]
        if char == "." and not seen_point:
            seen_point = True
        elif "0" <= char <= "9":
            value = value * 10.0 + (ord(char) - 48)
            if seen_point:
                scale *= 10.0
        else:
            break
        pos += 1
    if pos == end:
        return sign * value / scale
    if text[pos] not in "eE":
        return 0.0
    pos += 1
    exp_sign = 1
    if pos < end and text[pos] in "+-":
        exp_sign = -1 if text[pos] == "-" else 1
        pos += 1
    exponent = 0
    for char in text[pos:]:
        if not "0" <= char <= "9":
            return 0.0
        exponent = exponent * 10 + ord(char) - 48
    try:
        return sign * value / scale * 10.0 ** (exp_sign * exponent)
    except OverflowError:  # C++ pow() gives inf here
        return sign * math.inf if value else 0.0


def boolean(text: str) -> bool:
    """`StringUtils::boolean`, as used for query parameters such as waitForSync."""
    return text.strip().lower() in ("true", "yes", "on", "y", "1")

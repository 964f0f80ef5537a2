"""What the fast path (`proxy.fastpath`) reads and writes: the requests it takes,
parsed (`parse`), and its answers, encoded as aiohttp would send them (`encode`).

`parse` takes a request only when it is sure to read it as aiohttp's parser
(llhttp) would, and as the application would route it; every rule below sends
anything else to aiohttp, which judges it:

    request line   METHOD /path[?query] HTTP/1.1; the methods ArangoDB serves;
                   the characters RFC 3986 allows, within aiohttp's line limit;
                   a path without %-escapes, empty or dot segments, not /_proxy...
    header fields  name: value, token names, printable ASCII values; in all
                   within server.max_header_size (as refuse_unservable counts)
                   and aiohttp's count of fields
    exactly one    Host; at most one x-arango-async, "true" or "store"
    at most one    Content-Length (digits, within server.max_body_size); any
                   other field aiohttp's parser takes once only (Content-Type,
                   User-Agent, ...)
    none of        Transfer-Encoding, Expect, Upgrade, Origin (a browser's request:
                   the proxy's own answers to it get CORS headers, `proxy.cors`);
                   a Connection (or Proxy-Connection, read alike) other than
                   keep-alive or close
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from proxy import jobs_api
from proxy.arango_headers import ArangoHeaders
from proxy.auth import OMIT_CHALLENGE
from proxy.config import MAX_HEADER_FIELDS
from proxy.intake import ASYNC_HEADER, QUEUE_TIME_HEADER
from storage import JobMode

HEAD_END = b"\r\n\r\n"
_MAX_LINE = 8190  # aiohttp's max_line_size: a longer request line gets its 400
# methods ArangoDB serves that llhttp (aiohttp's parser) knows; RFC 3986 characters
_REQUEST_LINE = re.compile(
    r"(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1"
)
# a field: a token name, a colon, a value of printable ASCII, spaces and tabs (which
# is llhttp's rule: leading and trailing spaces and tabs are not part of the value)
_FIELDS = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t!-~]*\r\n)*")  # the whole block
# the fields the fast path looks at (in _take)
_NOTED = frozenset(
    {
        "host",
        "x-arango-async",
        "content-length",
        "connection",
        "proxy-connection",
        "authorization",
        "transfer-encoding",
        "expect",
        "upgrade",
        "origin",
        "x-omit-www-authenticate",
        "x-arango-queue-time-seconds",
    }
)
# fields aiohttp's parser refuses twice (RFC 9110's singletons; host and content-length
# are counted in `seen`, transfer-encoding handed over at once)
_SINGLETONS = frozenset(
    {
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "max-forwards",
        "server",
        "user-agent",
    }
)
_ODD_PATH = re.compile(r"%|//|/\.\.?(?:/|$)")
_REFUSED_FIELDS = frozenset({"transfer-encoding", "expect", "upgrade", "origin"})
_MODES = {"true": JobMode.FORGET, "store": JobMode.STORE}


class Submission:
    """A request the fast path takes, parsed: an async submission, one for the job
    API, or one to pass through."""

    __slots__ = (
        "authorization",
        "body",
        "close",
        "headers",
        "host",
        "job_api",
        "length",
        "method",
        "mode",
        "omit_challenge",
        "queue_limit",
        "target",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.headers: list[tuple[str, str]] = []
        self.host = ""
        self.authorization: str | None = None  # the first Authorization field
        self.omit_challenge = False  # x-omit-www-authenticate: a 401 without WWW-Authenticate
        self.queue_limit: str | None = None  # x-arango-queue-time-seconds
        self.mode: JobMode | None = None  # None: no x-arango-async
        self.job_api = False  # (without x-arango-async) for the job API; else pass-through
        self.length = 0  # of the body, from Content-Length
        self.body = b""
        self.close = False

    @property
    def head(self) -> bool:
        """A HEAD request: its answer has no body."""
        return self.method == "HEAD"


def parse(head: bytes, max_header_size: int, max_body_size: int) -> Submission | None:
    """The submission in `head` (without its blank line; its body not yet read), or
    None when aiohttp must have it."""
    text = head.decode("latin-1") + "\r\n"
    line, _, fields = text.partition("\r\n")
    submission = _request_line(line)
    if submission is None or _FIELDS.fullmatch(fields) is None:
        return None
    headers: list[tuple[str, str]] = []
    size = 0
    seen = {"host": 0, ASYNC_HEADER: 0, "content-length": 0}
    singles: set[str] = set()
    # (one field a line, each checked by _FIELDS: a name holds no colon, a value no CR)
    for field in fields.split("\r\n")[:-1]:
        name, _, value = field.partition(":")
        value = value.strip(" \t")
        headers.append((name, value))
        size += len(name) + len(value) + 4
        lower = name.lower()
        if lower in _NOTED:
            if lower in seen:
                seen[lower] += 1
            if not _take(submission, lower, value):
                return None
        elif lower in _SINGLETONS:
            if lower in singles:
                return None  # aiohttp's parser refuses it: the same answer on both paths
            singles.add(lower)
    if size > max_header_size or len(headers) >= MAX_HEADER_FIELDS:
        return None  # refuse_unservable's 431, or the parser's for too many fields
    submission.headers = headers
    if (
        seen["host"] != 1
        or seen[ASYNC_HEADER] > 1
        or seen["content-length"] > 1
        or submission.length > max_body_size  # aiohttp's path answers the 413
    ):
        return None
    if submission.method == "OPTIONS":
        # a CORS preflight: ArangoDB answers it itself, never queued, whatever the path
        submission.mode = None
    else:
        submission.job_api = submission.mode is None and jobs_api.is_job_api(submission.target)
    return submission


def _request_line(line: str) -> Submission | None:
    if len(line) > _MAX_LINE:
        return None
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return None
    submission = Submission()
    submission.method = match[1]
    submission.target = match[2]
    path = submission.target.partition("?")[0]
    if _ODD_PATH.search(path):
        return None
    if path.startswith("/_proxy"):
        return None  # the proxy's own routes
    return submission


def _take(submission: Submission, lower: str, value: str) -> bool:
    """Note what `submission` needs of a field; False if aiohttp must have it."""
    if lower == "host":
        submission.host = value
    elif lower == ASYNC_HEADER:
        mode = _MODES.get(value)
        if mode is None:
            return False
        submission.mode = mode
    elif lower == "content-length":
        if not value.isdigit() or len(value) > 18:  # (int() refuses 4,300 digits)
            return False
        submission.length = int(value)
    elif lower == "authorization":
        submission.authorization = value  # of repeated fields the last counts, as ArangoDB
    elif lower == OMIT_CHALLENGE:
        submission.omit_challenge = True
    elif lower == QUEUE_TIME_HEADER:
        submission.queue_limit = value
    elif lower in ("connection", "proxy-connection"):  # (llhttp reads both alike)
        option = value.lower()
        if option not in ("keep-alive", "close"):
            return False
        submission.close = submission.close or option == "close"  # any close line wins
    return lower not in _REFUSED_FIELDS


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value now (on the event loop's thread)."""
    global _date  # noqa: PLW0603 - a one-entry cache, as aiohttp keeps its own
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def _empty_status(status: int) -> bool:
    """A status whose answer has no body, hence no length (aiohttp removes it)."""
    return status in (204, 304) or status < 200


def stream_head(
    status: int,
    reason: str,
    headers: CIMultiDict[str],
    *,
    close: bool,
    head: bool = False,
    arango: ArangoHeaders | None = None,
) -> tuple[bytes, int | None]:
    """The status line and header block of an answer as aiohttp's StreamResponse
    writes them to an HTTP/1.1 request (`head`: to a HEAD request), and how its
    body is framed: the length to send, or None for chunked. `headers` is changed."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    length: int | None = 0
    if _empty_status(status):
        headers.popall("Content-Length", None)
    elif not head:  # (a HEAD answer keeps the length it was given, and sends nothing)
        declared = headers.get("Content-Length")
        length = int(declared) if declared is not None else None
        if length is None:
            headers["Transfer-Encoding"] = "chunked"
        if length != 0:
            headers.setdefault("Content-Type", "application/octet-stream")
    headers.setdefault("Date", http_date())
    if arango is not None and arango.pairs and arango.absent_from(headers):
        # The proxy's own answers (no header of ArangoDB's yet): its lines as made
        # once, where proxy.app's response hook puts them (after aiohttp's own Date,
        # Server, which ArangoDB's replaces, and Connection): a third of the cost.
        lines.extend([f"{name}: {value}\r\n" for name, value in headers.items()])
        server, rest = arango.lines
        lines.append(server or _SERVER_LINE)
        if close:
            lines.append("Connection: close\r\n")
        lines.append(rest)
    else:
        headers.setdefault("Server", SERVER_SOFTWARE)
        if close:
            headers.setdefault("Connection", "close")
        if arango is not None:  # (proxy.app's response hook runs after aiohttp's own)
            arango.apply(headers)
        lines.extend([f"{name}: {value}\r\n" for name, value in headers.items()])
    lines.append("\r\n")
    # (surrogateescape: bytes ArangoDB sent that are not UTF-8 go back as they came)
    return "".join(lines).encode("utf-8", "surrogateescape"), length


def accepted_head(
    job_id: int | None, date: str, *, close: bool, arango: tuple[bytes, bytes] = (b"", b"")
) -> bytes:
    """What `encode` makes of `proxy.intake.accepted` (the id only for ``store``) for a
    request other than HEAD, sent at `date` (`http_date`). Quick: it is built on the
    store's writer thread (`proxy.fastpath`)."""
    async_id = b"" if job_id is None else b"x-arango-async-id: %d\r\n" % job_id
    return b"".join(
        (
            _ACCEPTED_START,
            async_id,
            b"Content-Length: 0\r\nDate: ",
            date.encode(),
            b"\r\n",
            arango[0] or _ACCEPTED_SERVER,
            b"Connection: close\r\n" if close else b"",
            arango[1],
            b"\r\n",
        )
    )


_ACCEPTED_START = b"HTTP/1.1 202 Accepted\r\nContent-Type: text/plain\r\n"
_SERVER_LINE = f"Server: {SERVER_SOFTWARE}\r\n"
_ACCEPTED_SERVER = _SERVER_LINE.encode()


def encode(
    response: web.Response,
    *,
    close: bool,
    head: bool = False,
    arango: ArangoHeaders | None = None,
) -> bytes:
    """`response` as aiohttp sends it to an HTTP/1.1 request (`head`: to a HEAD
    request: the length of the body it would have, if any, and no body), with
    `arango`'s headers as proxy.app adds them. aiohttp's Response sets the length of
    its body, then frames it as a stream's."""
    body = response.body or b""
    assert isinstance(body, bytes)
    headers = CIMultiDict(response.headers)
    headers.popall("Content-Length", None)
    if body or not head:
        headers["Content-Length"] = str(len(body))
    block, length = stream_head(
        response.status, response.reason, headers, close=close, head=head, arango=arango
    )
    return block + body if length else block

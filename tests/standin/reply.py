"""What a handler answers, and ArangoDB's two error-body shapes.

Handlers return a `Reply` instead of an aiohttp response, so that the same
handler code serves a synchronous request and an async job whose answer is
stored and replayed later. The server's standard headers are not part of a
`Reply`: ArangoDB adds them each time a response is sent (also on replay).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSON = "application/json; charset=utf-8"
TEXT = "text/plain"

ERROR_MESSAGES = {
    400: "bad parameter",
    404: "not found",
    405: "method not supported",
}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    # headers the handler itself set (etag, location, ...), in order
    headers: tuple[tuple[str, str], ...] = field(default=())


def dumps(doc: Any) -> bytes:
    """ArangoDB's JSON: compact, UTF-8, key order as built."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def json_reply(status: int, doc: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, dumps(doc), JSON, headers)


def empty(status: int) -> Reply:
    return Reply(status)


def handler_error(status: int, error_num: int, message: str | None = None) -> Reply:
    """`RestHandler::generateError`: keys code, error, errorMessage, errorNum."""
    text = message if message is not None else ERROR_MESSAGES[error_num]
    doc = {"code": status, "error": True, "errorMessage": text, "errorNum": error_num}
    return json_reply(status, doc)


def pre_error(status: int, error_num: int, message: str) -> Reply:
    """`CommTask::sendErrorResponse` (before any handler): error, errorNum, errorMessage, code."""
    doc = {"error": True, "errorNum": error_num, "errorMessage": message, "code": status}
    return json_reply(status, doc)


BAD_PARAMETER = handler_error(400, 400)
NOT_FOUND = handler_error(404, 404)
METHOD_NOT_ALLOWED = handler_error(405, 405)
NOT_AUTHORIZED = pre_error(401, 11, "not authorized to execute this request")
DATABASE_NOT_FOUND = pre_error(404, 1228, "database not found")
DECODING_ERROR = pre_error(400, 10, "decoding error")
QUEUE_FULL = pre_error(503, 21003, "queue is full")
QUEUE_TIME_VIOLATED = pre_error(412, 21004, "queue time violated")
CANCELED = handler_error(410, 21, "canceled request")
QUERY_KILLED = handler_error(410, 1500, "query killed")
CORRUPTED_JSON = handler_error(400, 600, "invalid JSON object")

"""ArangoDB-shaped error responses, and the one place upstream failures are mapped.

Every error the proxy itself produces goes through `arango_error`, so clients
always get ``{"error":true,"errorNum":n,"errorMessage":"...","code":http}`` as
``application/json``. ArangoDB writes two key orders: handler errors start with
``code``, errors raised before a handler runs start with ``error``; both are
reproduced so the facade's bodies equal ArangoDB's byte for byte.

Upstream failures (``upstream_failure``)::

    asyncio.TimeoutError / ServerTimeoutError ─▶ 504, errorNum 504
    ClientConnectorCertificateError           ─▶ 503, "certificate could not be verified"
    ClientSSLError (other TLS handshake)      ─▶ 503, "TLS handshake ... failed"
    any other aiohttp.ClientError / OSError    ─▶ 503, errorNum 503
"""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
from aiohttp import web

from proxy.http1 import ConnectTimeout, ResponseParseError

JSON_TYPE = "application/json; charset=utf-8"

# errorNums used by the proxy (ArangoDB's errors.dat)
ERROR_INTERNAL = 4
ERROR_TRI_BAD_PARAMETER = 10  # TRI_ERROR_BAD_PARAMETER (its 'decoding error')
ERROR_FORBIDDEN = 11  # ArangoDB's TRI_ERROR_FORBIDDEN: 'not authorized...'
ERROR_REQUEST_CANCELED = 21
ERROR_BAD_PARAMETER = 400
ERROR_NOT_FOUND = 404
ERROR_METHOD_NOT_ALLOWED = 405
ERROR_HEADERS_TOO_LARGE = 431
ERROR_BAD_GATEWAY = 502
ERROR_DATABASE_NOT_FOUND = 1228
ERROR_SERVICE_UNAVAILABLE = 503
ERROR_GATEWAY_TIMEOUT = 504
ERROR_QUEUE_FULL = 21003
ERROR_QUEUE_TIME_VIOLATED = 21004


def error_body(status: int, error_num: int, message: str, *, handler: bool = True) -> bytes:
    """The JSON bytes of an ArangoDB error, in a handler's or the pre-handler key order."""
    if handler:
        doc: dict[str, object] = {
            "code": status,
            "error": True,
            "errorMessage": message,
            "errorNum": error_num,
        }
    else:
        doc = {"error": True, "errorNum": error_num, "errorMessage": message, "code": status}
    return json.dumps(doc, separators=(",", ":")).encode()


def arango_error(
    status: int, error_num: int, message: str, *, handler: bool = True
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, error_num, message, handler=handler),
        content_type="application/json",
        charset="utf-8",
    )


def headers_too_large(limit: int) -> web.Response:
    """431 for a request whose header fields exceed `limit` (server.max_header_size)."""
    return arango_error(
        431,
        ERROR_HEADERS_TOO_LARGE,
        f"request header fields are larger than the limit of {limit} bytes",
    )


class UpstreamFailure(Exception):
    """ArangoDB could not be reached or did not answer in time."""

    def __init__(self, status: int, error_num: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_num = error_num
        self.message = message

    def response(self) -> web.Response:
        return arango_error(self.status, self.error_num, self.message, handler=False)


def upstream_failure(exc: BaseException, upstream: str) -> UpstreamFailure:
    """Map a transport error talking to `upstream` to the error the client sees.

    Callers raise the result ``from exc`` so the cause stays in the traceback.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # (a ServerTimeoutError too)
        exc = ConnectTimeout("no connection within the connect timeout")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure(
            504, ERROR_GATEWAY_TIMEOUT, f"upstream ArangoDB at {upstream} did not answer in time"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        exc = exc.certificate_error
    if isinstance(exc, ssl.CertificateError):
        detail = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
        return UpstreamFailure(
            503,
            ERROR_SERVICE_UNAVAILABLE,
            f"upstream ArangoDB at {upstream}: its TLS certificate could not be verified"
            f" ({detail})",
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return UpstreamFailure(
            503,
            ERROR_SERVICE_UNAVAILABLE,
            f"upstream ArangoDB at {upstream}: the TLS handshake failed"
            f" ({getattr(exc, 'strerror', None) or exc}); does it serve TLS on that port?",
        )
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, ResponseParseError | aiohttp.ClientResponseError):
        # it answered, wrongly: not "unreachable" (RFC 9110 15.6.3)
        message = f"upstream ArangoDB at {upstream} sent an invalid answer: {reason}"
        return UpstreamFailure(502, ERROR_BAD_GATEWAY, message)
    return UpstreamFailure(
        503,
        ERROR_SERVICE_UNAVAILABLE,
        f"upstream ArangoDB at {upstream} is unreachable: {reason}",
    )

"""Intake: an async request (``x-arango-async: true|store``) becomes a durable job.

The caller is verified first (`proxy.auth`), the body is read within a size
limit and a deadline, the job is written through the store's group commit,
and only then does the client get its ``202``. A client that hangs up does not
abort the write half-way: handlers are not cancelled (`runner_options`, and the
fast path's own rule). `admit`, `undecodable` and `store_job` (then `stored` or
`refused`) serve aiohttp's path (`intake`) and the fast path (`proxy.fastpath`)
alike.

Refusals, all in ArangoDB's error shape::

    credentials refused ─▶ ArangoDB's own 401/11 or 404/1228
    JWT with allowed_paths, upstream.jwt_secret_file set ─▶ 403/11
    ArangoDB unreachable, credentials not known ─▶ 503
    body over server.max_body_size ─▶ 413      body too slow ─▶ 408
    gzip or deflate body that does not decode ─▶ 400/10 "decoding error"
    jobs.capacity unfinished jobs ─▶ 503/21003 "queue is full"
    job store near storage.max_db_size ─▶ 503/21003 "queue is full (...)"
    store cannot write (disk full, busy, I/O) ─▶ 503/503; nothing was stored
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.arango_request import header
from proxy.auth import OMIT_CHALLENGE, Caller
from proxy.errors import (
    ERROR_FORBIDDEN,
    ERROR_QUEUE_FULL,
    ERROR_QUEUE_TIME_VIOLATED,
    ERROR_SERVICE_UNAVAILABLE,
    ERROR_TRI_BAD_PARAMETER,
    arango_error,
)
from proxy.passthrough import forwarded_headers
from proxy.state import CONFIG, CREDENTIALS, DISPATCHER, METRICS, STORE, VERIFIER
from storage import CapacityExceeded, JobMode, NewJob, StoreError, StoreFull

log = logging.getLogger(__name__)

ASYNC_HEADER = "x-arango-async"
ASYNC_ID_HEADER = "x-arango-async-id"
ERROR_REQUEST_TIMEOUT = 408
ERROR_TOO_LARGE = 413

# Not stored with the job: the dispatcher sets its own async header, the
# credentials live in their own column (wiped when done, or never stored at
# all with upstream.jwt_secret_file), and aiohttp computes the length of the
# stored body.
NOT_STORED = (ASYNC_HEADER, "authorization", "content-length", "expect")


QUEUE_TIME_HEADER = "x-arango-queue-time-seconds"


def _seconds(value: str | None) -> float:
    """A number of seconds as ArangoDB reads it leniently; 0 (no limit) if none."""
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


# ArangoDB decodes these before it looks at x-arango-async (spec §1.3, step 3)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
DECODED = frozenset(_WBITS)  # Content-Encodings whose body is checked before queueing
DECODE_CHECK_LIMIT = 256 * 2**20  # bytes decoded: beyond, ArangoDB has the last word


async def undecodable(
    app: web.Application, headers: CIMultiDict[str], body: bytes
) -> web.Response | None:
    """ArangoDB's 400 "decoding error", at once, for a gzip or deflate body that does
    not decode: it would never queue the job. One that decodes is stored as it came,
    and ArangoDB decodes it when the job gets there. (Decoded beside the event loop,
    the output thrown away: a small body may decode to gigabytes.)"""
    wbits = _WBITS.get(header(headers, "Content-Encoding") or "")
    if wbits is None or await asyncio.to_thread(_decodes, wbits, body):
        return None
    app[METRICS]["jobs_refused_total"] += 1
    return arango_error(400, ERROR_TRI_BAD_PARAMETER, "decoding error", handler=False)


def _decodes(wbits: int, body: bytes) -> bool:
    decoder = zlib.decompressobj(wbits)
    pending, decoded = body, 0
    try:
        while not decoder.eof and decoded < DECODE_CHECK_LIMIT:
            chunk = decoder.decompress(pending, 2**20)
            pending = decoder.unconsumed_tail
            if not chunk and not pending:
                break  # all of it read, and the stream has not ended
            decoded += len(chunk)
    except zlib.error:
        return False
    return decoder.eof or decoded >= DECODE_CHECK_LIMIT


def queue_time_refusal(app: web.Application, limit: str | None) -> web.Response | None:
    """ArangoDB's 412 for a request whose x-arango-queue-time-seconds `limit` is
    shorter than the queue's wait: here the proxy's own queue, how long its oldest job
    not yet sent has waited. None: no limit, or it holds."""
    seconds = _seconds(limit)
    if seconds > 0 and app[STORE].queue_time() > seconds:
        return arango_error(412, ERROR_QUEUE_TIME_VIOLATED, "queue time violated", handler=False)
    return None


def async_mode(request: web.Request) -> JobMode | None:
    """ArangoDB compares the value case-sensitively; anything else runs synchronously."""
    value = header(request.headers, ASYNC_HEADER)
    if value == "store":
        return JobMode.STORE
    if value == "true":
        return JobMode.FORGET
    return None


async def read_body(request: web.Request) -> bytes | web.Response:
    """The whole body, or the 413/408 to answer instead."""
    if not request.body_exists:
        return b""
    limit = request.app[CONFIG].server.max_body_size
    if request.content_length is not None and request.content_length > limit:
        return _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(request.app[CONFIG].server.body_timeout):
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    return _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        return body_too_slow()
    return b"".join(chunks)


def body_too_slow() -> web.Response:
    return arango_error(408, ERROR_REQUEST_TIMEOUT, "request body was not received in time")


def _too_large(limit: int) -> web.Response:
    return arango_error(
        413, ERROR_TOO_LARGE, f"request body is larger than the limit of {limit} bytes"
    )


async def intake(request: web.Request, mode: JobMode) -> web.Response:
    verified = await admit(
        request.app,
        header(request.headers, "Authorization"),
        request.raw_path,
        omit_challenge=OMIT_CHALLENGE in request.headers,
    )
    if isinstance(verified, web.Response):
        return verified
    body = await read_body(request)
    if isinstance(body, web.Response):
        return body
    headers = forwarded_headers(request, drop=NOT_STORED)
    refusal = await undecodable(request.app, headers, body)
    if refusal is not None:
        return refusal
    method, target = request.method, request.raw_path
    started = store_job(
        request.app, mode, verified, method=method, target=target, headers=headers, body=body
    )
    if isinstance(started, web.Response):
        return started
    job_id, future = started
    # Handlers run on when their client leaves (runner_options), so the job is
    # stored all the same; it only misses its 202.
    try:
        await future
    except StoreError as exc:
        return refused(request.app, exc, method=method, target=target)
    stored(request.app)
    return accepted(mode, job_id)


async def admit(
    app: web.Application, authorization: str | None, raw_target: str, *, omit_challenge: bool
) -> Caller | web.Response:
    """The verified caller whose jobs may be queued, or the refusal to answer."""
    verified = await app[VERIFIER].caller_of(
        authorization, raw_target, omit_challenge=omit_challenge
    )
    if isinstance(verified, web.Response):
        return verified
    if not app[CREDENTIALS].can_act_for(verified.authorization):
        return arango_error(
            403,
            ERROR_FORBIDDEN,
            "the proxy signs its own tokens (upstream.jwt_secret_file) and cannot keep a "
            "token's allowed_paths limit; send this request without x-arango-async",
            handler=False,
        )
    return verified


def store_job(
    app: web.Application,
    mode: JobMode,
    caller: Caller,
    *,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: bytes,
    on_durable: Callable[[int], None] | None = None,
) -> web.Response | tuple[int, asyncio.Future[Any]]:
    """The job handed to the store: its id and the write's future (once it is done:
    `stored` and its 202, or `refused` for its StoreError), or the refusal to answer
    at once. Its body must have been checked to decode (`undecodable`).

    `on_durable`: see `JobStore.accept` (the fast path sends the 202 from there).

    x-arango-queue-time-seconds (ArangoDB: 412 at once when its queue time is longer)
    is checked against the proxy's own queue: how long its oldest job not yet sent
    has waited. It is stored with the job too, and ArangoDB checks its own queue
    against it when the job gets there (a 412 is then the job's result)."""
    refusal = queue_time_refusal(app, header(headers, QUEUE_TIME_HEADER))
    if refusal is not None:
        app[METRICS]["jobs_refused_total"] += 1
        return refusal
    job = NewJob(
        mode=mode,
        user=caller.user,
        database=caller.database,
        method=method,
        target=target,
        headers=tuple(headers.items()),
        # None when the proxy signs its own tokens (upstream.jwt_secret_file)
        auth=app[CREDENTIALS].to_store(caller.authorization),
        body=body,
        created=time.time(),
    )
    try:
        return app[STORE].accept_nowait(job, on_durable)
    except StoreError as exc:
        return refused(app, exc, method=method, target=target)


def stored(app: web.Application) -> None:
    """A job handed to the store (`store_job`) is committed: counted, and sent on."""
    app[METRICS]["jobs_accepted_total"] += 1
    app[DISPATCHER].wake()


def refused(app: web.Application, error: StoreError, *, method: str, target: str) -> web.Response:
    """The answer to a job the store refused (`store_job`): 503, and why."""
    app[METRICS]["jobs_refused_total"] += 1
    if isinstance(error, StoreFull):
        return arango_error(503, ERROR_QUEUE_FULL, f"queue is full ({error})", handler=False)
    if isinstance(error, CapacityExceeded):
        return arango_error(503, ERROR_QUEUE_FULL, "queue is full", handler=False)
    log.error("cannot store job %s %s: %s", method, target, error)
    return arango_error(
        503, ERROR_SERVICE_UNAVAILABLE, f"the proxy cannot store the job: {error}", handler=False
    )


def accepted(mode: JobMode, job_id: int) -> web.Response:
    """ArangoDB's answer to an async request: 202, empty, its job id for `store`."""
    response = web.Response(status=202, headers={"Content-Type": "text/plain"})
    if mode is JobMode.STORE:
        response.headers[ASYNC_ID_HEADER] = str(job_id)
    return response

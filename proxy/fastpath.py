"""The fast path: async submissions and job API requests served without aiohttp's
request cycle.

Why: the proxy runs on one core's worth of Python (the GIL is shared by the
event loop and the store's threads), and aiohttp's own handling of a request
(request and response objects, router, middleware, writer) cost more of it than
storing the job. Under bench/accept.py's load (dispatcher and harvester
running) the proxy's CPU per accept went from about 189 to 134 us with it.

How: every client connection starts here. A request that has arrived whole and
that `proxy.fastpath_http.parse` takes (the plainest HTTP/1.1; an async
submission, or a request for the job API) is answered here by the functions
aiohttp's path calls (`proxy.intake.admit`, `store_job` and the rest, `jobs_api.answer`), so
the answers are the same. Anything else hands the connection to aiohttp at that
request's first byte: the transport's protocol becomes aiohttp's, which is fed
every byte from there on and serves the connection for the rest of its life.
aiohttp's parser thus judges everything unusual (malformed, oversize, chunked,
arriving in parts), and the fast path only has to be exact about what it takes.

The 202 of an async submission leaves from the store's writer thread the moment
its job has committed (`proxy.early202`); pass-through replies are streamed back
by `proxy.fastpath_relay`.

A connection stays here while idle for server.idle_timeout at most, as aiohttp's
keep-alive. A request is never cancelled because its client left (as
``handler_cancellation=False``): its job is stored, only the 202 is lost.
Requests pipelined behind one under way wait in a buffer; past _PAUSE_AT bytes
the connection stops reading until it is served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from typing import cast

from aiohttp import web
from multidict import CIMultiDict

from proxy import jobs_api
from proxy.arango_request import header, query_params
from proxy.auth import Caller
from proxy.early202 import Early202, left
from proxy.errors import ERROR_INTERNAL, arango_error
from proxy.fastpath_http import (
    HEAD_END,
    Submission,
    encode,
    parse,
)
from proxy.fastpath_relay import relay
from proxy.intake import (
    DECODED,
    NOT_STORED,
    accepted,
    admit,
    body_too_slow,
    queue_time_refusal,
    refused,
    store_job,
    stored,
    undecodable,
)
from proxy.passthrough import forwarded
from proxy.state import CONFIG, CREDENTIALS, METRICS, VERIFIER
from storage import StoreError

log = logging.getLogger(__name__)

_PAUSE_AT = 256 * 1024  # bytes waiting behind a request under way: stop reading
_AWAITED_BODY = 1024 * 1024  # a body still coming is awaited here up to this size
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4
# RFC 9113: the server's preface (an empty SETTINGS frame), then GOAWAY: last stream 0,
# error HTTP_1_1_REQUIRED (0xd), and a word for whoever reads the client's log
_GOAWAY_DEBUG = b"this server speaks HTTP/1.1 only"
_HTTP2_LINGER = 1.0  # seconds the refused connection stays open, reading nothing
_HTTP2_REFUSAL = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + (8 + len(_GOAWAY_DEBUG)).to_bytes(3, "big")
    + b"\x07\x00\x00\x00\x00\x00"
    + (0).to_bytes(4, "big")
    + (0xD).to_bytes(4, "big")
    + _GOAWAY_DEBUG
)


class FastPath(asyncio.Protocol):
    """One client connection, served here until a request needs aiohttp."""

    def __init__(self, front: FastFront) -> None:
        self._front = front
        self._loop = front.loop
        self._buffer = bytearray()
        self._busy = False  # a request is being served; later bytes wait in _buffer
        self._paused = False  # reading, while too much waits in _buffer
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused
        self._head_sent = False  # of a streamed answer: no 500 can follow it
        self._awaited: tuple[Submission, int] | None = None  # its body still coming
        self._body_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._refused = False  # HTTP/2 refused (_refuse_http2): what comes is dropped
        self._peer = ""
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._fd = -1  # a copy of the socket for early 202s, once needed (see Early202)
        self._early: Early202 | None = None  # its 202 may be being sent on another thread
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, (list, tuple)) else ""
        self._front.connections.add(self)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop_awaiting()
        self.resume_writing()  # a stream waiting to write sees the client gone
        self._front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._close_fd()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # (HTTP/2 refused: the connection closes shortly)
        self._buffer += data
        if not self._busy and self._writable is None:
            self._next()
        elif len(self._buffer) > _PAUSE_AT and not self._paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._paused = True

    @property
    def idle(self) -> bool:
        """Between requests: neither serving one nor awaiting its body, and none waits
        to be served (for the client to read its answers)."""
        return not self._busy and self._awaited is None and not self._buffer

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    def _next(self) -> None:
        """Serve the requests at the start of the buffer: here, those that need nothing
        awaited (`_answer_now`); the first other one in a task of its own, which calls
        this again when it is done. Or wait for the rest of a body, or hand over."""
        assert self.transport is not None
        # Not while the client leaves its answers unread (writing paused: past the
        # transport's high-water mark), as aiohttp's own path drains; nor once closing
        # (after a Connection: close, what follows is never served).
        while (
            self._buffer
            and self._writable is None
            and not self._closed
            and not self.transport.is_closing()
        ):
            submission = self._take()
            if submission is None:
                return
            if self._answer_now(submission) or self._accept_now(submission):
                if self._busy:
                    return  # (an accept: `_stored` goes on)
                continue
            self._busy = True
            self._loop.create_task(self._serve(submission))
            return

    def _take(self) -> Submission | None:
        """The whole request at the start of the buffer, taken out of it; None when
        there is none yet, or the connection was handed over or closed instead."""
        if self._awaited is not None:
            submission, start = self._awaited
        elif self._front.closing:
            self.close()  # no new request once a stop began
            return None
        else:
            if self._buffer.startswith(HTTP2_PREFACE):
                self._refuse_http2()
                return None
            end = self._buffer.find(HEAD_END)
            if end < 0:
                self._hand_over()  # a head in parts: aiohttp reads it, with its timeouts
                return None
            config = self._front.config
            parsed = parse(bytes(self._buffer[:end]), config.max_header_size, config.max_body_size)
            if parsed is None:
                self._hand_over()
                return None
            submission, start = parsed, end + len(HEAD_END)
        if len(self._buffer) - start < submission.length:
            self._await_body(submission, start)
            return None
        self._stop_awaiting()
        if submission.length:
            submission.body = bytes(self._buffer[start : start + submission.length])
        del self._buffer[: start + submission.length]
        self._front.metrics["fast_path_requests_total"] += 1
        return submission

    def _answer_now(self, submission: Submission) -> bool:
        """Answer at once a request for a job's status or result when nothing needs to
        be awaited: its credentials are known (verified lately) and the store's copies
        in memory have the job (`jobs_api.answer_now`). No task, no coroutines: a
        client polling for its job costs the loop about a third less (30 against
        40-53 us a poll, measured alone). False if `_serve` must serve the request."""
        if not submission.job_api or submission.queue_limit is not None:
            return False
        app = self._front.app
        caller = app[VERIFIER].known_caller(submission.authorization, submission.target)
        if caller is None:
            return False
        suffixes = jobs_api.suffixes_of(submission.target)
        assert suffixes is not None  # parse() took it as the job API
        try:
            response = jobs_api.answer_now(app, submission.method, suffixes, caller.viewer)
            if response is None:
                return False
            self._answered_now(submission, response)
        except Exception:
            self._failed(submission)
            self._answered_now(submission, close=True)
        return True

    def _answered_now(
        self, submission: Submission, response: web.Response | None = None, *, close: bool = False
    ) -> None:
        """A request served at once (no task): `response` written, then close or idle."""
        close = close or submission.close or self._front.closing
        if response is not None:
            self.answer_with(submission, response, close=close)
        if close:
            self.close()
        self._idle()

    def _accept_now(self, submission: Submission) -> bool:
        """Hand an async submission to the store when nothing needs to be awaited
        before: its credentials are known (verified lately) and its body needs no
        decoding check. No task, no coroutines: the write's future calls `_stored`.
        False if `_serve` must serve the request."""
        if submission.mode is None or submission.head:
            return False
        app = self._front.app
        caller = app[VERIFIER].known_caller(submission.authorization, submission.target)
        if caller is None or not app[CREDENTIALS].can_act_for(caller.authorization):
            return False
        headers = self._stored_headers(submission)
        if header(headers, "Content-Encoding") in DECODED:
            return False
        try:
            refusal = self._to_store(submission, caller, headers)
        except Exception:
            self._failed(submission)
            self._answered_now(submission, close=True)
            return True
        if refusal is not None:
            self._answered_now(submission, refusal)
        return True

    def _to_store(
        self, submission: Submission, caller: Caller, headers: CIMultiDict[str]
    ) -> web.Response | None:
        """Hand an admitted async submission to the store: the connection is busy
        until the write's future calls `_stored`; or the refusal to answer at once."""
        assert submission.mode is not None
        early = self._early_202(submission)
        started = store_job(
            self._front.app,
            submission.mode,
            caller,
            method=submission.method,
            target=submission.target,
            headers=headers,
            body=submission.body,
            on_durable=early,
        )
        if isinstance(started, web.Response):
            return started
        job_id, future = started
        self._busy = True
        self._early = early
        future.add_done_callback(functools.partial(self._stored, submission, job_id, early))
        return None

    def _stored(
        self,
        submission: Submission,
        job_id: int,
        early: Early202 | None,
        future: asyncio.Future[object],
    ) -> None:
        """The write of `_to_store` is over: its answer, then the next request."""
        self._early = None
        close = submission.close
        app = self._front.app
        try:
            response: web.Response | None = None
            try:
                future.result()  # (never cancelled: nothing else holds it)
            except StoreError as exc:
                response = refused(app, exc, method=submission.method, target=submission.target)
            else:
                stored(app)
                if not left(early):
                    assert submission.mode is not None
                    response = accepted(submission.mode, job_id)
            if response is not None:
                self.answer_with(submission, response, close=close)
            elif early is not None and early.unsent:
                self.write(early.unsent)  # what the kernel did not take of the 202
        except Exception:
            self._head_sent = left(early)  # a bug after the commit: no 500 after a 202
            self._failed(submission)
            close = True
        self._served(close=close)

    def _failed(self, submission: Submission) -> None:
        """A bug while serving `submission`: logged, and a 500 if nothing was sent yet
        (the connection must then close)."""
        log.exception("error serving %s %s", submission.method, submission.target)
        if not self._head_sent:
            error = arango_error(500, ERROR_INTERNAL, "internal error")
            self.write(self._encode(error, close=True, head=submission.head))

    def _await_body(self, submission: Submission, start: int) -> None:
        """A body still coming: awaited here up to _AWAITED_BODY bytes, for at most
        server.body_timeout; a larger one streams through aiohttp."""
        if submission.length > _AWAITED_BODY:
            self._hand_over()
            return
        if self._awaited is None:
            self._awaited = (submission, start)
            self._body_timer = self._loop.call_later(
                self._front.config.body_timeout, self._body_late
            )

    def _stop_awaiting(self) -> None:
        self._awaited = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        """The body did not come in time: an async submission gets the intake's 408
        (and the connection closes: the rest of its body is not read); anything else
        goes on in aiohttp, which never waits for a body there."""
        assert self._awaited is not None
        submission = self._awaited[0]
        self._body_timer = None
        self._stop_awaiting()
        if submission.mode is not None:
            self.write(self._encode(body_too_slow(), close=True, head=submission.head))
            self.close()
        else:
            self._hand_over()

    async def _serve(self, submission: Submission) -> None:
        close = submission.close
        try:
            if submission.mode is None and not submission.job_api:
                close = await relay(
                    self._front.app,
                    submission,
                    self,
                    peer=self._peer,
                    secure=self._front.secure,
                    close=close or self._front.closing,
                )
            else:
                response = await self._answer(submission)
                if response is None:
                    return  # handed to the store: `_stored` answers and goes on
                self.answer_with(submission, response, close=close)
        except Exception:
            self._failed(submission)
            close = True
        self._served(close=close)

    def _served(self, *, close: bool) -> None:
        """A request under way is answered: close, or serve the next one."""
        self._head_sent = False
        if close or self._front.closing:
            self.close()
        self._busy = False
        self._idle()
        if self._closed:
            self._close_fd()
            return
        self._go_on()

    def _go_on(self) -> None:
        """Serve again (nothing under way, or the client read its answers); read again
        once what waits is below _PAUSE_AT, or a body needs more bytes."""
        self._next()
        if self._paused and (self._awaited is not None or len(self._buffer) <= _PAUSE_AT):
            self._resume_reading()

    def _resume_reading(self) -> None:
        self._paused = False
        if not self._closed:
            assert self.transport is not None
            self.transport.resume_reading()

    def answer_with(self, submission: Submission, response: web.Response, *, close: bool) -> None:
        """Write `response` to `submission`; it says the connection closes after it when
        `close` or a stop has begun."""
        closing = close or self._front.closing
        self.write(self._encode(response, close=closing, head=submission.head))

    def _encode(self, response: web.Response, *, close: bool, head: bool) -> bytes:
        arango = self._front.app[VERIFIER].arango_headers
        return encode(response, close=close, head=head, arango=arango)

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        if not self._closed:
            assert self.transport is not None
            self.transport.write(data)

    def write_head(self, data: bytes) -> None:
        self.write(data)
        self._head_sent = True

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)
        if not self._closed:
            self._loop.call_soon(self._resumed)

    def _resumed(self) -> None:
        """Writing resumed a moment ago: go on, unless a request is under way (it goes
        on itself) or writing paused again."""
        if not self._busy and not self._closed and self._writable is None:
            self._go_on()

    async def _answer(self, submission: Submission) -> web.Response | None:
        """The answer to write; None if the submission went to the store (`_to_store`)."""
        app = self._front.app
        if submission.mode is None:
            return await self._job_api(submission)
        verified = await admit(
            app,
            submission.authorization,
            submission.target,
            omit_challenge=submission.omit_challenge,
        )
        if isinstance(verified, web.Response):
            return verified
        headers = self._stored_headers(submission)
        refusal = await undecodable(app, headers, submission.body)
        if refusal is not None:
            return refusal
        return self._to_store(submission, verified, headers)

    def _stored_headers(self, submission: Submission) -> CIMultiDict[str]:
        """The headers an async submission's job keeps (forwarded, without NOT_STORED)."""
        return forwarded(
            submission.headers,
            peer=self._peer,
            secure=self._front.secure,
            host=submission.host,
            drop=NOT_STORED,
        )

    def _early_202(self, submission: Submission) -> Early202 | None:
        """An `Early202` for this submission's 202, or None where the loop must send it."""
        assert self.transport is not None
        if (
            self._front.secure
            or submission.head
            or self._closed
            or self.transport.get_write_buffer_size()
        ):
            return None
        if self._fd < 0:
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return None
            try:
                self._fd = os.dup(sock.fileno())
            except OSError:  # (out of descriptors: the loop sends the 202 itself)
                return None
        return Early202(self._fd, submission, self._front)

    def _close_fd(self) -> None:
        """Close the socket's copy, unless an early 202 may be using it (then this is
        called again once that submission is answered)."""
        if self._fd >= 0 and self._early is None:
            os.close(self._fd)
            self._fd = -1

    async def _job_api(self, submission: Submission) -> web.Response:
        """As `jobs_api.handle` answers a request without x-arango-async."""
        app = self._front.app
        suffixes = jobs_api.suffixes_of(submission.target)
        assert suffixes is not None  # parse() took it as the job API
        verified = await app[VERIFIER].caller_of(
            submission.authorization, submission.target, omit_challenge=submission.omit_challenge
        )
        if isinstance(verified, web.Response):
            return verified
        refusal = queue_time_refusal(app, submission.queue_limit)
        if refusal is not None:
            return refusal
        query = query_params(submission.target.partition("?")[2])
        return await jobs_api.answer(app, submission.method, suffixes, query, verified.viewer)

    def _refuse_http2(self) -> None:
        """A client speaking HTTP/2 at once (prior knowledge, as arangodb-java-driver 7
        by default): the proxy serves HTTP/1.1 only, and says so in HTTP/2 (a SETTINGS
        frame, then GOAWAY with HTTP_1_1_REQUIRED), where aiohttp would answer an
        HTTP/1.1 400 such a client cannot read. (A preface in parts goes to aiohttp,
        whose timers bound a client that stops half-way.) The client's next frames are
        read and dropped for a moment before the proxy hangs up, so that its GOAWAY is
        not lost to a reset."""
        assert self.transport is not None
        self._refused = True
        self._buffer.clear()
        self.transport.write(_HTTP2_REFUSAL)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._loop.call_later(_HTTP2_LINGER, self.close)

    def _hand_over(self) -> None:
        """aiohttp serves this connection from here on, from the buffer's first byte."""
        assert self.transport is not None
        self._front.metrics["connections_handed_over_total"] += 1
        self._front.connections.discard(self)
        self._close_fd()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._paused:
            self._resume_reading()  # aiohttp reads on, and pauses by its own rules
        handler = self._front.aiohttp_protocol()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        handler.data_received(data)

    def _idle(self) -> None:
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(
                self._idle_since + self._front.config.idle_timeout, self._check_idle
            )

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._closed:
            return
        if not self.idle:
            return  # the next _idle() (after an answer) looks again
        due = self._idle_since + self._front.config.idle_timeout
        if self._loop.time() >= due:
            self.close()
        else:
            self._idle_timer = self._loop.call_at(due, self._check_idle)


class FastFront:
    """Makes a `FastPath` per connection, and stops them."""

    def __init__(
        self,
        app: web.Application,
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        *,
        secure: bool,
    ) -> None:
        self.app = app
        self.config = app[CONFIG].server
        self.metrics = app[METRICS]
        self.aiohttp_protocol = aiohttp_protocol
        self.secure = secure
        self.loop = asyncio.get_running_loop()
        self.connections: set[FastPath] = set()
        self.closing = False

    def __call__(self) -> FastPath:
        return FastPath(self)

    async def shutdown(self, grace: float) -> None:
        """No new requests here; idle connections close at once, busy ones after
        their answer; waits at most `grace` seconds for those, then cuts the rest (as
        aiohttp does its own): a request still under way gets no answer, rather than
        the 503 "unreachable" that closing the upstream's connections would give it,
        which would tell its client it never reached ArangoDB."""
        self.closing = True
        deadline = self.loop.time() + grace
        while True:
            for connection in list(self.connections):
                if connection.idle or self.loop.time() >= deadline:
                    connection.close()
            if not self.connections or self.loop.time() >= deadline:
                return
            await asyncio.sleep(0.01)

"""The /_api/job facade: ArangoDB's job API, answered from the proxy's store.

Served under ``/_api/job`` and ``/_admin/job``, with or without a
``/_db/{name}`` prefix (jobs belong to users, not databases). Every status,
body and header follows ``arangodb-async-api.md`` §2-§8::

    GET    /{id}               200 done · 204 pending · 404
    GET    /done|pending       200 ["id", ...]   (count: default 100, 0 → at most 1)
    PUT    /{id}               the job's own response + x-arango-async-id, then gone · 204 · 404
    PUT    /{id}/cancel        200 {"result":true} · 404
    DELETE /all|expired|{id}   200 {"result":true} · 404 · 400 without stamp
    other methods              405

A request to the job API that itself carries ``x-arango-async`` is a job like
any other (ArangoDB queues it too); the dispatcher runs it here, through
`execute`, instead of sending it to ArangoDB, which knows none of our ids.
"""

from __future__ import annotations

import json
import re

from aiohttp import web
from multidict import CIMultiDict

from proxy.arango_request import header, query_params
from proxy.auth import arango_path, job_at_arangodb
from proxy.errors import (
    ERROR_BAD_PARAMETER,
    ERROR_METHOD_NOT_ALLOWED,
    ERROR_NOT_FOUND,
    ERROR_REQUEST_CANCELED,
    ERROR_SERVICE_UNAVAILABLE,
    JSON_TYPE,
    UpstreamFailure,
    arango_error,
    error_body,
)
from proxy.intake import (
    ASYNC_ID_HEADER,
    QUEUE_TIME_HEADER,
    async_mode,
    intake,
    queue_time_refusal,
)
from proxy.passthrough import passthrough
from proxy.recording import record, record_result
from proxy.state import CREDENTIALS, STORE, UPSTREAM, VERIFIER
from storage import Answering, JobState, ResultTooLarge, StoredResponse, StoreError
from storage.records import Job
from storage.store import UNKNOWN

JOB_PATH = re.compile(r"^(?:/_db/[^/?]+)?/_(?:api|admin)/job(?=/|$)")
ROUTES = tuple(
    prefix + base + r"{tail:(/[\s\S]*)?}"  # also a decoded newline (%0A)
    for prefix in ("", "/_db/{database}")
    for base in ("/_api/job", "/_admin/job")
)

MAX_ID = 2**64 - 1
DEFAULT_COUNT = 100
CANCEL_TRIES = 8  # a job changes state at most a few times a cancel's duration
_DIGITS = re.compile(r"[0-9]*")
_DECIMAL = re.compile(r"([-+]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([-+]?)([0-9]*))?")

CANCELED = StoredResponse(
    410,
    (("Content-Type", JSON_TYPE),),
    error_body(410, ERROR_REQUEST_CANCELED, "canceled request"),
)


def parse_uint64(text: str) -> int:
    """ArangoDB's StringUtils::uint64 (std::from_chars): leading ASCII digits, no
    sign or space; 0 without any, or on overflow. Never int() of a huge string,
    which Python refuses beyond 4300 digits."""
    match = _DIGITS.match(text)
    digits = match.group().lstrip("0") if match else ""
    if len(digits) > 20:
        return 0
    value = int(digits) if digits else 0
    return value if value <= MAX_ID else 0


def parse_stamp(text: str) -> float:
    """ArangoDB's StringUtils::doubleDecimal: the whole value must be a decimal
    number (sign, digits, one point, exponent; ASCII only), else 0."""
    match = _DECIMAL.fullmatch(text)
    if match is None:
        return 0.0
    sign, whole, fraction, exp_sign, exponent = match.groups()
    return float(f"{sign}{whole or 0}.{fraction or 0}e{exp_sign or ''}{exponent or 0}")


def is_job_api(raw_target: str) -> bool:
    """Whether ArangoDB would hand this raw target to its job handler."""
    return JOB_PATH.match(arango_path(raw_target)) is not None


def suffixes_of(raw_target: str) -> list[str] | None:
    """The raw (still percent-encoded) segments after /_api/job (or /_admin/job).

    ArangoDB's job handler reads the raw suffixes: ``/_api/job/%61ll`` is no
    ``all``, and the fetched job's ``x-arango-async-id`` is the id exactly as
    sent. None when only the decoded path names the job API (``/_api/job%2F1``):
    ArangoDB routes on the raw path, so such a path is not its job API either.
    """
    path = arango_path(raw_target)
    match = JOB_PATH.match(path)
    if match is None:
        return None
    return [part for part in path[match.end() :].split("/") if part]


def _bad_parameter() -> web.Response:
    return arango_error(400, ERROR_BAD_PARAMETER, "bad parameter")


def _not_found() -> web.Response:
    return arango_error(404, ERROR_NOT_FOUND, "not found")


def _empty(status: int) -> web.Response:
    return web.Response(status=status, headers={"Content-Type": "text/plain"})


def _result_true() -> web.Response:
    return web.Response(body=b'{"result":true}', content_type="application/json", charset="utf-8")


async def handle(request: web.Request) -> web.StreamResponse:
    if request.method == "OPTIONS":
        # ArangoDB answers a CORS preflight itself, before credentials or handlers
        return await passthrough(request)
    mode = async_mode(request)
    if mode is not None:
        return await intake(request, mode)
    suffixes = suffixes_of(request.raw_path)
    if suffixes is None:
        return await passthrough(request)
    verified = await request.app[VERIFIER].caller(request)
    if isinstance(verified, web.Response):
        return verified
    # (as ArangoDB checks every request, once its credentials pass)
    refusal = queue_time_refusal(request.app, header(request.headers, QUEUE_TIME_HEADER))
    if refusal is not None:
        return refusal
    query = query_params(request.rel_url.raw_query_string)
    return await answer(request.app, request.method, suffixes, query, verified.viewer)


async def execute(app: web.Application, job_id: int, method: str, target: str, user: str) -> None:
    """Run stored job `job_id`, an async request for the job API, here as ArangoDB
    would run it, and record its answer as the job's result. A result it fetches
    (``PUT /{id}``) leaves the store in the write that records it: no crash leaves it
    in neither job, and a full store has its room for the copy; that write is retried
    until it commits, as any result's. Deletes (``DELETE /{id}``, ``/all``,
    ``/expired``) are made in the write that records the answer (`Answering`). A
    store error before the record, or in a delete's write, is raised: the job stays
    accepted and runs again later, as ArangoDB's own 503s are retried rather than
    kept as results."""
    path, _, query = target.partition("?")
    suffixes = suffixes_of(path)
    assert suffixes is not None, "the dispatcher only runs job-API paths here"
    viewer = user or None
    store = app[STORE]
    if method == "DELETE":
        # (answers of a few dozen bytes: any storage.max_db_size allows 8 KiB a result)
        answering = Answering(job_id, _stored(_result_true()), _stored(_not_found()))
        response = await _delete(app, suffixes, query_params(query), viewer, answering)
        if response.status == 400:  # (nothing deleted, nothing recorded)
            await record_result(store, job_id, _stored(response))
        return
    if method != "PUT" or len(suffixes) != 1:
        response = await _answer(app, method, suffixes, query_params(query), viewer)
        await record_result(store, job_id, _stored(response))
        return
    fetched = parse_uint64(suffixes[0])
    outcome = await store.take_result(fetched, viewer, hold=True)
    result = _stored(_result_answer(outcome, suffixes[0]))
    if not isinstance(outcome, StoredResponse):
        await record_result(store, job_id, result)
        return
    # (cancelled by a stop, the result stays held until the store closes: after the
    # next start it is in the fetched job still, or in this one)
    try:
        await record(
            f"the result of job {job_id}",
            lambda: store.finish(job_id, result, taking=fetched),
        )
    except ResultTooLarge:
        store.give_back(fetched)  # (too large to copy: a fetch of its own still gets it)
        await record_result(store, job_id, result)  # (the answer dropped, as its result)
    except Exception:
        store.give_back(fetched)  # (a bug: the job runs again, and finds the result)
        raise


def _stored(response: web.Response) -> StoredResponse:
    headers = tuple((k, v) for k, v in response.headers.items() if k.lower() != "content-length")
    body = response.body
    assert body is None or isinstance(body, bytes)
    return StoredResponse(response.status, headers, body or b"")


async def answer(
    app: web.Application,
    method: str,
    suffixes: list[str],
    query: dict[str, str],
    viewer: str | None,
) -> web.Response:
    try:
        return await _answer(app, method, suffixes, query, viewer)
    except StoreError as exc:
        return _store_failed(exc)


async def _answer(
    app: web.Application,
    method: str,
    suffixes: list[str],
    query: dict[str, str],
    viewer: str | None,
) -> web.Response:
    """`answer`, with the store's errors raised."""
    if method == "GET":
        return await _get(app, suffixes, query, viewer)
    if method == "PUT":
        return await _put(app, suffixes, viewer)
    if method == "DELETE":
        return await _delete(app, suffixes, query, viewer)
    return arango_error(405, ERROR_METHOD_NOT_ALLOWED, "method not supported")


def answer_now(
    app: web.Application, method: str, suffixes: list[str], viewer: str | None
) -> web.Response | None:
    """`answer` to a job's status (GET /{id}) or result (PUT /{id}) when the store's
    copies in memory have it, without awaiting anything (the fast path answers a
    client that polls for its job at once, with no task); None: await `answer`."""
    if len(suffixes) != 1:
        return None
    store = app[STORE]
    try:
        if method == "GET" and _is_id(suffixes[0]):
            state = store.state_now(parse_uint64(suffixes[0]), viewer)
            return None if state is UNKNOWN else _state_answer(state)
        if method == "PUT":
            outcome = store.take_result_now(parse_uint64(suffixes[0]), viewer)
            return None if outcome is UNKNOWN else _result_answer(outcome, suffixes[0])
    except StoreError as exc:
        return _store_failed(exc)
    return None


def _store_failed(exc: StoreError) -> web.Response:
    return arango_error(503, ERROR_SERVICE_UNAVAILABLE, f"the proxy's job store failed: {exc}")


def _is_id(suffix: str) -> bool:
    """GET /{suffix} asks for a job's state (else: a list, or a bad parameter)."""
    return suffix[:1] in _ID_START


_ID_START = frozenset("123456789")


def _state_answer(state: JobState | None) -> web.Response:
    if state is None:
        return _not_found()
    return _empty(200 if state is JobState.DONE else 204)


def _result_answer(outcome: StoredResponse | JobState | None, raw_id: str) -> web.Response:
    if outcome is None:
        return _not_found()
    if isinstance(outcome, JobState):
        return _empty(204)
    headers = CIMultiDict(outcome.headers)
    headers[ASYNC_ID_HEADER] = raw_id
    return web.Response(status=outcome.status, headers=headers, body=outcome.body)


async def _get(
    app: web.Application, suffixes: list[str], query: dict[str, str], viewer: str | None
) -> web.Response:
    if len(suffixes) != 1:
        return _bad_parameter()
    what = suffixes[0]
    store = app[STORE]
    if _is_id(what):
        return _state_answer(await store.state(parse_uint64(what), viewer))
    if what not in ("done", "pending"):
        return _bad_parameter()
    text = query.get("count")
    count = DEFAULT_COUNT if text is None else parse_uint64(text)
    # ArangoDB appends before it compares with count, so 0 still lists one id.
    limit = min(max(count, 1), 2**62)
    ids = await store.list_ids(done=what == "done", viewer=viewer, limit=limit)
    return web.Response(
        body=json.dumps([str(i) for i in ids], separators=(",", ":")).encode(),
        content_type="application/json",
        charset="utf-8",
    )


async def _put(app: web.Application, suffixes: list[str], viewer: str | None) -> web.Response:
    if len(suffixes) == 2:
        if suffixes[1] != "cancel":
            return _bad_parameter()
        return await _cancel(app, parse_uint64(suffixes[0]), viewer)
    if len(suffixes) != 1:
        return _bad_parameter()
    outcome = await app[STORE].take_result(parse_uint64(suffixes[0]), viewer)
    return _result_answer(outcome, suffixes[0])


async def _cancel(app: web.Application, job_id: int, viewer: str | None) -> web.Response:
    store = app[STORE]
    job = await store.get(job_id, viewer)
    # Each try fails only if the job moved on meanwhile (the dispatcher sent it, the
    # harvester finished or requeued it): look again.
    for _ in range(CANCEL_TRIES):
        if job is None:
            break
        if job.state is JobState.ACCEPTED and await store.cancel_accepted(job_id, CANCELED):
            return _result_true()
        at_arangodb = job.upstream_id  # (submitted jobs have one, and only they)
        if at_arangodb is not None and await store.cancel_submitted(job_id, at_arangodb):
            return await _cancel_upstream(app, at_arangodb, job)
        job = await store.get(job_id, viewer)
    if job is not None:
        # (a job changes state a few times in a cancel's duration at most: not seen yet)
        return arango_error(
            503,
            ERROR_SERVICE_UNAVAILABLE,
            f"job {job_id} changed state {CANCEL_TRIES} times during this cancel, which "
            "was not recorded; try again",
        )
    if await store.state(job_id, viewer) is JobState.DONE:
        return _result_true()  # as ArangoDB: cancelling a finished job does nothing
    return arango_error(
        404,
        ERROR_NOT_FOUND,
        f"could not find job ({job_id}) in AsyncJobManager during cancel operation",
    )


async def _cancel_upstream(app: web.Application, upstream_id: str, job: Job) -> web.Response:
    """ArangoDB cancels the job it runs; its (410) result arrives through the harvester.
    (The cancel is recorded before: if ArangoDB loses the job, it is not sent again.
    A cancel that surely never reached ArangoDB is taken back: its client is told it
    failed, and the job is as if it had not been asked; unless an earlier cancel was
    recorded, which may have reached ArangoDB.)"""
    headers = app[CREDENTIALS].headers(job.user, job.auth)
    try:
        await app[UPSTREAM].call(
            "PUT", job_at_arangodb(job.target, upstream_id) + "/cancel", headers
        )
    except UpstreamFailure as failure:
        if isinstance(failure.__cause__, ConnectionRefusedError) and not job.cancelled:
            await app[STORE].cancel_submitted(job.id, upstream_id, cancelled=False)
        return failure.response()
    # Any answer will do: 404 means ArangoDB lost the job, which the harvester handles.
    return _result_true()


async def _delete(
    app: web.Application,
    suffixes: list[str],
    query: dict[str, str],
    viewer: str | None,
    answering: Answering | None = None,
) -> web.Response:
    """`answering`: the job this delete is run for, finished with its answer in the
    write of the deletes (`execute`), except a bad parameter's (400), which deletes
    nothing."""
    if len(suffixes) != 1:
        return _bad_parameter()
    store = app[STORE]
    what = suffixes[0]
    if what == "all":
        await store.delete_all(viewer, answering)
    elif what == "expired":
        stamp = query.get("stamp")
        if stamp is None:
            return _bad_parameter()
        await store.delete_expired(viewer, parse_stamp(stamp), answering)
    elif not await store.delete(parse_uint64(what), viewer, answering):
        return _not_found()
    return _result_true()

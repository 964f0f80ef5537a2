"""How records map to SQLite values and back.

Text must be valid UTF-8 for SQLite, but aiohttp hands undecodable request bytes
over as lone surrogates (``surrogateescape``). Binding such a string would raise
inside the writer and fail every other write of its batch, so strings that cannot
be encoded are stored as a BLOB holding their JSON form instead: lossless,
deterministic (a viewer encoded the same way still matches its jobs), and the
common case stays plain TEXT.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any, cast

from storage.records import Headers, Job, JobMode, JobState, StoredResponse

# Python ints bind as signed 64-bit integers; larger ids cannot exist in the table.
MAX_ID = 2**63 - 1


def valid_id(job_id: int) -> bool:
    """Ids come from HTTP as any uint64; only 1..2**63-1 can name a row."""
    return 1 <= job_id <= MAX_ID


def text_param(value: str) -> str | bytes:
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode("ascii")
    return value


def optional_text_param(value: str | None) -> str | bytes | None:
    return None if value is None else text_param(value)


def text_value(stored: str | bytes) -> str:
    return stored if isinstance(stored, str) else cast(str, json.loads(stored))


def headers_param(headers: Headers) -> str:
    """``[[name, value], ...]`` as json.dumps writes it (ASCII, no spaces), built from
    the json module's C string encoder: several times faster than dumps on a list."""
    return "[" + ",".join([f"[{_quoted(name)},{_quoted(value)}]" for name, value in headers]) + "]"


def headers_value(stored: str) -> Headers:
    return tuple((name, value) for name, value in json.loads(stored))


def job_from_row(row: Sequence[Any]) -> Job:
    """A row of ``sql.JOB_COLUMNS``."""
    (id_, mode, state, user, database, method, target, headers, auth, body) = row[:10]
    created, upstream_id, attempts, cancelled = row[10:]
    return Job(
        id=id_,
        mode=JobMode(mode),
        state=JobState(state),
        user=text_value(user),
        database=text_value(database),
        method=text_value(method),
        target=text_value(target),
        headers=headers_value(headers),
        auth=None if auth is None else text_value(auth),
        body=body,
        created=created,
        upstream_id=None if upstream_id is None else text_value(upstream_id),
        attempts=attempts,
        cancelled=bool(cancelled),
    )


def response_from_row(row: Sequence[Any]) -> StoredResponse:
    """A row of ``sql.RESULT_COLUMNS``."""
    status, headers, body = row
    return StoredResponse(status=status, headers=headers_value(headers), body=body)

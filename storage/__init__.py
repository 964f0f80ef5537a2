"""The durable job store: SQLite (WAL) behind a group-committing writer.

``storage`` knows nothing of HTTP; the proxy reaches SQLite only through
:class:`JobStore`. The records it speaks in live in :mod:`storage.records`.
"""

from storage.errors import CapacityExceeded, ResultTooLarge, StoreError, StoreFull
from storage.records import (
    Answering,
    Headers,
    Job,
    JobMode,
    JobState,
    Mark,
    NewJob,
    Removed,
    StoredResponse,
)
from storage.store import JobStore

__all__ = [
    "Answering",
    "CapacityExceeded",
    "Headers",
    "Job",
    "JobMode",
    "JobState",
    "JobStore",
    "Mark",
    "NewJob",
    "Removed",
    "ResultTooLarge",
    "StoreError",
    "StoreFull",
    "StoredResponse",
]

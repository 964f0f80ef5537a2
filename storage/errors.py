"""The store's exceptions: every SQLite or file-system failure surfaces as a StoreError.

Error tree::

    StoreError            the store cannot do what was asked (I/O, full disk, not our file, closed)
     └─ CapacityExceeded  accept() refused: as many unfinished jobs as the capacity allows
         └─ StoreFull     accept() refused: the database is near its size limit
    ResultTooLarge        finish() refused a result that can never fit (not a StoreError:
                          trying again cannot help)
"""

from __future__ import annotations


class StoreError(Exception):
    """Any failure of the job store, with a message that says what and where."""


class CapacityExceeded(StoreError):
    """accept() was called while the store already holds `capacity` unfinished jobs."""


class StoreFull(CapacityExceeded):
    """accept() was called while the database fills its share of ``max_size``."""


class ResultTooLarge(Exception):
    """finish() was given a result larger than the store can ever hold: than a store
    limited by ``max_size`` can, or than SQLite keeps in a row (`RESULT_MOST`)."""

"""The optional size limit of the database file (``storage.max_db_size``).

SQLite's ``max_page_count`` makes the file unable to grow past the limit. New
jobs may fill only part of it: a quarter (at least a few pages) stays in
reserve, because moving jobs on (submitted, done with a result) rewrites their
rows, and SQLite writes the new copy of a row before it frees the old one. A
store full of unfinished jobs with no reserve could never make room again.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiosqlite

from storage.errors import StoreFull

RESERVE_FRACTION = 4
RESERVE_MIN_PAGES = 4
SQLITE_MAX_PAGE_COUNT = 4294967294


@dataclass(frozen=True, slots=True)
class SizeLimit:
    intake_pages: int  # pages new jobs may fill
    hard_pages: int  # pages SQLite allows
    page_size: int

    @classmethod
    async def apply(cls, db: aiosqlite.Connection, max_size: int) -> tuple[SizeLimit, int]:
        """Cap the file at `max_size` bytes; the limit and the pages used now.

        SQLite never sets the cap below the pages the file has already: a file
        that is larger than the limit cannot grow, and takes new jobs once
        enough of it is free again.
        """
        [(page_size,)] = await db.execute_fetchall("PRAGMA page_size")
        # (SQLite allows no more pages than SQLITE_MAX_PAGE_COUNT: a larger limit is that)
        wanted = min(max(1, max_size // page_size), SQLITE_MAX_PAGE_COUNT)
        [(hard,)] = await db.execute_fetchall(f"PRAGMA max_page_count = {wanted}")
        reserve = max(RESERVE_MIN_PAGES, wanted // RESERVE_FRACTION)
        [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
        [(free,)] = await db.execute_fetchall("PRAGMA freelist_count")
        limit = cls(max(1, wanted - reserve), int(hard), int(page_size))
        return limit, int(pages) - int(free)

    @property
    def largest_row(self) -> int:
        """Bytes of the largest job or result stored: each must fit in the reserve on
        its own (see the module's docstring)."""
        return (self.hard_pages - self.intake_pages) * self.page_size // 2

    def too_large(self, what: str, size: int) -> str | None:
        """Why `size` bytes of `what` can never be stored, or None if they can."""
        if size <= self.largest_row:
            return None
        return (
            f"{what} of {size} bytes is too large for a job store limited to "
            f"{self.hard_pages * self.page_size} bytes (storage.max_db_size)"
        )

    def check_room(self, size: int, used_pages: int, queued: int = 0) -> None:
        """Raise StoreFull unless a new job of `size` bytes fits beside `used_pages` and
        the `queued` bytes of jobs accepted but not committed yet (a burst's jobs pass
        this check before any of them commits: without them, it could fill the reserve)."""
        reason = self.too_large("a job", size)
        if reason is not None:
            raise StoreFull(reason)
        if used_pages + (size + queued) // self.page_size >= self.intake_pages:
            raise StoreFull(
                "the job store is near its size limit (storage.max_db_size); "
                "fetch or delete job results to make room"
            )

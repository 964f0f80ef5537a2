"""Retention: deletes finished results nobody fetched, when the operator asks for it.

Both rules are off by default, as in ArangoDB, which keeps a result until it is
fetched or deleted::

    jobs.result_ttl > 0        a result still unfetched result_ttl seconds after its
                               job finished is deleted; swept every min(ttl / 4, 1 s)
                               (but at most every 10 ms)
    jobs.max_result_bytes > 0  when stored results (headers and bodies) exceed it, the
                               oldest finished are deleted until they fit; checked
                               right after each result is stored, and at start-up

Only finished (done) jobs are deleted, never unfinished ones. A deleted job is
gone as if its owner had deleted it: its id answers 404 like an unknown one and
it is absent from the lists. Each sweep that deletes anything logs one line
(how many, how many bytes, which rule) and adds to the counters
``results_expired_total`` / ``results_evicted_total`` (and their ``_bytes_``
twins) in /_proxy/metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from storage import JobStore, Removed

log = logging.getLogger(__name__)

SWEEP_MAX = 1.0  # seconds between expiry sweeps at most
SWEEP_MIN = 0.01  # and at least: a TTL of a millisecond must not spin the loop
RETRY_AFTER = 1.0  # seconds to wait after a sweep failed (the store may be failing)


class Retention:
    def __init__(
        self, store: JobStore, *, ttl: float, max_bytes: int, metrics: Counter[str]
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._over = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return bool(self._ttl or self._max_bytes)

    def result_stored(self) -> None:
        """The store's result listener: wake the eviction when the cap is exceeded."""
        if self._max_bytes and self._store.result_bytes > self._max_bytes:
            self._over.set()

    async def run(self) -> None:
        loops = []
        if self._ttl:
            loops.append(self._expire_loop())
        if self._max_bytes:
            self._over.set()  # the store may be over the cap already (a lowered cap)
            loops.append(self._evict_loop())
        await asyncio.gather(*loops)

    async def expire(self) -> Removed:
        """Delete the results unfetched for longer than the TTL; log and count them."""
        removed = await self._store.expire_results(time.time() - self._ttl)
        self._report(
            removed,
            "expired",
            f"unfetched for longer than jobs.result_ttl = {self._ttl:g} s",
        )
        return removed

    async def evict(self) -> Removed:
        """Delete the oldest results until they fit under the cap; log and count them."""
        removed = await self._store.evict_results(self._max_bytes)
        self._report(
            removed,
            "evicted",
            f"oldest first, to keep stored results within jobs.max_result_bytes"
            f" = {self._max_bytes}",
        )
        return removed

    async def _expire_loop(self) -> None:
        interval = max(SWEEP_MIN, min(self._ttl / 4, SWEEP_MAX))
        while True:
            if not await self._sweep(self.expire):
                await asyncio.sleep(RETRY_AFTER)
            await asyncio.sleep(interval)

    async def _evict_loop(self) -> None:
        while True:
            await self._over.wait()
            # Cleared before the sweep: a result stored during it wakes the loop again.
            self._over.clear()
            if not await self._sweep(self.evict):
                self._over.set()
                await asyncio.sleep(RETRY_AFTER)

    async def _sweep(self, sweep: Callable[[], Awaitable[Removed]]) -> bool:
        try:
            await sweep()
        except Exception:
            log.exception("retention sweep failed; trying again")
            return False
        return True

    def _report(self, removed: Removed, what: str, why: str) -> None:
        if not removed.count:
            return
        self._metrics[f"results_{what}_total"] += removed.count
        self._metrics[f"results_{what}_bytes_total"] += removed.bytes
        log.info(
            "retention: %s %d unfetched result%s (%d bytes), %s",
            what,
            removed.count,
            "" if removed.count == 1 else "s",
            removed.bytes,
            why,
        )

"""Typed application keys: what the application holds for its handlers."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from aiohttp import web

from proxy.auth import Verifier
from proxy.config import Config
from proxy.tokens import JobCredentials
from proxy.upstream import Upstream
from storage import JobStore


class Waker(Protocol):
    """What the intake needs of the dispatcher: a nudge that work is waiting."""

    def wake(self) -> None: ...


CONFIG = web.AppKey("config", Config)
UPSTREAM = web.AppKey("upstream", Upstream)
STORE = web.AppKey("store", JobStore)
VERIFIER = web.AppKey("verifier", Verifier)
DISPATCHER = web.AppKey("dispatcher", Waker)
# what the proxy sends to ArangoDB on a job's behalf (proxy.tokens)
CREDENTIALS = web.AppKey("credentials", JobCredentials)
# counters by name (proxy.ops.COUNTERS lists them); a plain Counter keeps
# dispatcher and harvester free of any metrics library
METRICS = web.AppKey("metrics", Counter[str])

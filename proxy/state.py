"""Typed application keys: what the application holds for its handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.config import Config
from proxy.upstream import Upstream

if TYPE_CHECKING:
    pass

CONFIG = web.AppKey("config", Config)
UPSTREAM = web.AppKey("upstream", Upstream)

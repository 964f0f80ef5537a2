"""Builds the aiohttp application: the route table and the lifetimes of its parts.

Start-up order: upstream session. Shutdown runs it backwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy import ops
from proxy.config import Config
from proxy.passthrough import passthrough
from proxy.state import CONFIG, UPSTREAM
from proxy.upstream import Upstream


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream = Upstream(app[CONFIG].upstream)
    await upstream.start()
    app[UPSTREAM] = upstream
    yield
    await upstream.close()


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_size)
    app[CONFIG] = config
    app.cleanup_ctx.append(_upstream_ctx)
    app.router.add_routes(
        [
            web.get("/_proxy/health", ops.health),
            web.route("*", "/{tail:.*}", passthrough),
        ]
    )
    return app

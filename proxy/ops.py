"""Operations endpoints under /_proxy/: health for orchestrators."""

from __future__ import annotations

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    """200 as soon as the proxy serves requests; says nothing about ArangoDB."""
    return web.json_response({"status": "ok"})

"""Operations endpoints under /_proxy/: health, readiness, Prometheus metrics.

GET /_proxy/health   200 as soon as the proxy serves requests
GET /_proxy/ready    200 when ArangoDB answers at all (within READY_TIMEOUT), else
                     503 (the store is open whenever the proxy serves)
GET /_proxy/metrics  counters and gauges in Prometheus' text format
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import ERROR_SERVICE_UNAVAILABLE, UpstreamFailure, arango_error
from proxy.state import METRICS, STORE, UPSTREAM

PREFIX = "arango_async_proxy_"
# seconds ArangoDB has to answer a readiness check: a probe must get its answer, not
# wait for upstream.request_timeout (300 s) on an ArangoDB that took the connection
READY_TIMEOUT = 3.0

COUNTERS = {
    "jobs_accepted_total": "async requests written to the store and answered 202",
    "jobs_refused_total": "async requests refused: 503 (capacity, store failing), 412 (queue time)",
    "fast_path_requests_total": "requests answered on the fast path, not by aiohttp",
    "connections_handed_over_total": "client connections handed from the fast path to aiohttp",
    "jobs_submitted_total": "jobs handed to ArangoDB in store mode",
    "submit_retries_total": "submissions ArangoDB refused for now (503) or could not take",
    "jobs_harvested_total": "results fetched from ArangoDB and stored",
    "jobs_lost_total": "jobs ArangoDB forgot (restart), re-run or ended per lost_job_policy",
    "worker_restarts_total": "times the worker process (dispatcher, harvester) died and restarted",
    "results_expired_total": "unfetched results deleted after jobs.result_ttl",
    "results_expired_bytes_total": "bytes of the results deleted after jobs.result_ttl",
    "results_evicted_total": "oldest results deleted to stay within jobs.max_result_bytes",
    "results_evicted_bytes_total": "bytes of the results deleted for jobs.max_result_bytes",
}


async def health(request: web.Request) -> web.Response:
    """200 as soon as the proxy serves requests; says nothing about ArangoDB."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when ArangoDB answers at all: even a 401 shows it is up and serving."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[UPSTREAM].call("GET", "/_api/version", CIMultiDict())
    except UpstreamFailure as failure:
        why = failure.message
    except TimeoutError:
        why = f"upstream ArangoDB did not answer within {READY_TIMEOUT:g} s"
    else:
        return web.json_response({"status": "ready"})
    return arango_error(503, ERROR_SERVICE_UNAVAILABLE, f"not ready: {why}", handler=False)


async def metrics(request: web.Request) -> web.Response:
    counts = request.app[METRICS]
    store = request.app[STORE]
    lines: list[str] = []
    for name, help_text in COUNTERS.items():
        lines += [
            f"# HELP {PREFIX}{name} {help_text}",
            f"# TYPE {PREFIX}{name} counter",
            f"{PREFIX}{name} {counts[name]}",
        ]
    gauges = {
        "jobs_unfinished": ("jobs accepted or at ArangoDB, not done yet", store.unfinished),
        "store_commits": ("SQLite transactions committed since start", store.commits),
        "results_stored_bytes": ("bytes of finished results held for fetching", store.result_bytes),
    }
    for name, (help_text, value) in gauges.items():
        lines += [
            f"# HELP {PREFIX}{name} {help_text}",
            f"# TYPE {PREFIX}{name} gauge",
            f"{PREFIX}{name} {value}",
        ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

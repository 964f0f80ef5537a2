"""An ArangoDB stand-in for the tests: a real aiohttp server, faithful to
/work/shared/arangodb-async-api.md for async execution and the job API.

In-process use (pytest-asyncio)::

    standin = StandIn(users={"root": ""}, auth=True, workers=4, queue_size=128, jwt_secret=None,
                      ssl_context=None,  # an ssl.SSLContext: serve TLS only, url is https://
                      trusted_origins=())  # --http.trusted-origin ("*": all)
    url = await standin.start(host="127.0.0.1", port=0)
    await standin.restart()   # jobs, results and cursors lost; data and tick counter kept
    standin.queue_full = True # every async request: 503/21003
    await standin.unreachable(6.0)  # off the network for 6 s; nothing forgotten
    standin.write_count("_system", "coll", "key")  # inserts really executed (incl. 409s)
    standin.executed[("POST", "/_api/document/coll")]
    standin.received  # [(method, raw path, Authorization or None)], every request as it came
    await standin.stop()

As a process: ``python -m tests.standin --host 127.0.0.1 --port 0 [--tls PEM]`` (see __main__).
"""

from tests.standin.auth import make_jwt
from tests.standin.server import DEFAULT_USERS, StandIn

__all__ = ["DEFAULT_USERS", "StandIn", "make_jwt"]

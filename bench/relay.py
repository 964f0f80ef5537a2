"""End to end's ceiling: a bare relay doing per job the least any proxy of this shape
must, in one process on uvloop, so that bench/e2e.py's figure can be read against it
(as bench/accept.py's against a bare aiohttp handler).

    python bench/relay.py PORT UPSTREAM [--durable FOLDER]

Per job, what the proxy does at the least: answer the client's submission 202 with an
id of its own; send the job to ArangoDB in store mode; ask for its result a millisecond
after ArangoDB's 202 (again every 5 ms while pending); answer the client's
`PUT /_api/job/{id}` from memory (204 while pending). With `--durable`, the accept and
the result are each committed to SQLite (WAL, synchronous=FULL) by one group-committing
thread before anyone hears of them, and a fetched result's delete joins the next
commit: the proxy's durability, and nothing more. Nothing else: no credentials, no
other routes, no config, no errors handled beyond what the benchmark's load makes
(any other request is a 400), httptools parsing both ways, one task per job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop

ACCEPTED = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: text/plain\r\nx-arango-async-id: %d\r\n"
    b"Content-Length: 0\r\n\r\n"
)
PENDING = b"HTTP/1.1 204 No Content\r\n\r\n"
RESULT = (
    b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nx-arango-async-id: %d\r\n"
    b"Content-Length: %d\r\n\r\n"
)
REFUSED = b"HTTP/1.1 %d Error\r\nContent-Length: 0\r\n\r\n"
FIRST_LOOK = 0.001
NEXT_LOOK = 0.005
MAX_INFLIGHT = 64


class Store:
    """Group commit on a thread of its own: each batch one transaction; `then` runs on the
    loop once its write has committed."""

    def __init__(self, folder: Path, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[tuple[str, int, bytes | None, Callable[[], None] | None]] = deque()
        self._wake = threading.Event()
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            folder / "relay.sqlite3", isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, request BLOB, result BLOB)"
        )
        threading.Thread(target=self._serve, args=(db,), daemon=True).start()

    def write(
        self, kind: str, job: int, value: bytes | None, then: Callable[[], None] | None
    ) -> None:
        self._queue.append((kind, job, value, then))
        if kind != "delete":  # a fetched result's delete waits for the next commit
            self._wake.set()

    def _serve(self, db: sqlite3.Connection) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            batch = []
            while self._queue:
                batch.append(self._queue.popleft())
            if not batch:
                continue
            db.execute("BEGIN IMMEDIATE")
            for kind, job, value, _ in batch:
                if kind == "accept":
                    db.execute("INSERT INTO jobs (id, request) VALUES (?, ?)", (job, value))
                elif kind == "result":
                    db.execute(
                        "UPDATE jobs SET result = ?, request = NULL WHERE id = ?", (value, job)
                    )
                else:
                    db.execute("DELETE FROM jobs WHERE id = ?", (job,))
            db.execute("COMMIT")
            done = [then for *_, then in batch if then is not None]
            if done:
                self._loop.call_soon_threadsafe(_run_all, done)


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to ArangoDB, one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's: not a subclass)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self._reply is not None
        self._reply.set_result(
            (self._parser.get_status_code(), self._headers, b"".join(self._body))
        )
        self._headers, self._body = {}, []

    def exchange(self, request: bytes) -> asyncio.Future[tuple[int, dict[bytes, bytes], bytes]]:
        assert self.transport is not None
        self._reply = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._reply


class Relay:
    def __init__(self, upstream: str, store: Store | None) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 8529
        self._store = store
        self._idle: list[Upstream] = []
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._next_id = 0
        self.pending: set[int] = set()
        self.results: dict[int, tuple[int, bytes]] = {}
        host = b"Host: " + parts.netloc.encode() + b"\r\nContent-Length: 0\r\n"
        self._submit = b"PUT /_api/version HTTP/1.1\r\n" + host + b"x-arango-async: store\r\n\r\n"
        self._fetch = b"PUT /_api/job/%s HTTP/1.1\r\n" + host + b"\r\n"

    def accept(self, request: bytes, answer: Callable[[bytes], None]) -> None:
        self._next_id += 1
        job = self._next_id
        self.pending.add(job)

        def accepted() -> None:
            answer(ACCEPTED % job)
            asyncio.get_running_loop().create_task(self._run(job))

        if self._store is None:
            accepted()
        else:
            self._store.write("accept", job, request, accepted)

    def fetch(self, job: int) -> bytes:
        if job in self.results:
            status, body = self.results.pop(job)
            if self._store is not None:
                self._store.write("delete", job, None, None)
            return RESULT % (status, job, len(body)) + body
        return PENDING if job in self.pending else REFUSED % 404

    async def _call(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self._idle:
            connection = self._idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, connection = await loop.create_connection(Upstream, self._host, self._port)
        reply = await connection.exchange(request)
        self._idle.append(connection)
        return reply

    async def _run(self, job: int) -> None:
        async with self._slots:
            _, headers, _ = await self._call(self._submit)
            upstream_id = headers[b"x-arango-async-id"]
            await asyncio.sleep(FIRST_LOOK)
            while True:
                status, _, body = await self._call(self._fetch % upstream_id)
                if status != 204:
                    break
                await asyncio.sleep(NEXT_LOOK)

        def done() -> None:
            self.pending.discard(job)
            self.results[job] = (status, body)

        if self._store is None:
            done()
        else:
            self._store.write("result", job, body, done)


class Client(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._mode: bytes | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # (uvloop's: not a subclass)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._answer(REFUSED % 400)
            if self._transport is not None:
                self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-arango-async":
            self._mode = value

    def on_message_complete(self) -> None:
        url, mode = self._url, self._mode
        self._url, self._mode = b"", None
        if mode == b"store":
            self._relay.accept(url, self._answer)
        elif url.startswith(b"/_api/job/") and url[10:].isdigit():
            self._answer(self._relay.fetch(int(url[10:])))
        else:
            self._answer(REFUSED % 400)

    def _answer(self, response: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(port: int, upstream: str, durable: Path | None) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(upstream, Store(durable, loop) if durable is not None else None)
    server = await loop.create_server(lambda: Client(relay), "127.0.0.1", port)
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await asyncio.Event().wait()  # until the benchmark stops us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream", help="ArangoDB's URL, http://host:port")
    parser.add_argument("--durable", type=Path, metavar="FOLDER", help="commit to SQLite here")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.port, args.upstream, args.durable))


if __name__ == "__main__":
    main()

"""The worker process's channel to the proxy: messages over a stream socket, each
turn's as one pickled frame (both ends are this program; see proxy.worker_process)."""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
from collections.abc import Callable
from typing import Any, cast

_FRAME = struct.Struct("!I")
log = logging.getLogger(__name__)


class Channel(asyncio.Protocol):
    """Messages over a stream socket: what is sent during one turn of the event loop
    leaves as one frame (its length, then the list of messages, pickled once), in one
    write. Under load each side sends many messages a turn (calls, replies), and a
    pickle call and a frame per message cost the proxy's loop more than the store
    calls themselves."""

    def __init__(self, received: Callable[[Any], None], lost: Callable[[], None]) -> None:
        self._received = received
        self._lost = lost
        self._buffer = bytearray()
        self._outbox: list[tuple[Any, ...]] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buffer, start)
            end = start + _FRAME.size + size
            if len(buffer) < end:
                break
            messages = pickle.loads(buffer[start + _FRAME.size : end])  # noqa: S301 - our child
            start = end
            for message in messages:
                self._received(message)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def send(self, message: tuple[Any, ...]) -> None:
        """Queued for sending; dropped once the other end is gone."""
        if self._transport is None or self._transport.is_closing():
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if messages and self._transport is not None and not self._transport.is_closing():
            try:
                payload = pickle.dumps(messages, pickle.HIGHEST_PROTOCOL)
                frame = _FRAME.pack(len(payload))
            except Exception:
                # (a bug, or a frame of 4 GiB: never a message lost with its caller left
                # waiting; the worker process exits with the channel, and is started again)
                log.exception("cannot send %d message(s): closing the channel", len(messages))
                self._transport.close()
                return
            self._transport.write(frame + payload)

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()

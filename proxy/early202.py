"""An async submission's 202, sent from the store's writer thread.

The fast path (`proxy.fastpath`) hands each job to the store with an `Early202`
as its `on_durable` (`JobStore.accept`): the moment the job's batch has
committed, the writer's thread sends the 202 itself, where the event loop would
hear of the commit a turn or two later; and the loop's thread is what limits
accepts/s (its own work for the send system call was a fifth of its time per
accept). The send goes to a copy (os.dup) of the connection's socket, which the
connection owns and closes only when no such send can be under way
(`FastPath._close_fd`), so the number can never reach another connection. Not
over TLS (the transport encrypts), nor when the transport still holds unsent
bytes, nor for HEAD: those 202s leave from the loop as before. A 202 the kernel
took only in part is finished by the loop.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from proxy.fastpath_http import Submission, accepted_head, http_date
from proxy.state import VERIFIER
from storage import JobMode

if TYPE_CHECKING:
    from proxy.fastpath import FastFront


class Early202:
    """An async submission's 202, sent on the store's writer thread as soon as its job
    is on disk (`JobStore.accept`'s on_durable). `unsent` is what the loop must still
    write: None if this never ran (the job was not stored: the loop answers as usual),
    the rest of the 202 if the kernel took only part of it."""

    __slots__ = ("_arango", "_close", "_date", "_fd", "_front", "_store", "unsent")

    def __init__(self, fd: int, submission: Submission, front: FastFront) -> None:
        self._fd = fd
        self._store = submission.mode is JobMode.STORE
        self._close = submission.close
        self._front = front
        self._date = http_date()
        self._arango = front.app[VERIFIER].arango_headers.encoded
        self.unsent: bytes | None = None

    def __call__(self, job_id: int) -> None:
        close = self._close or self._front.closing  # (a stop may have begun meanwhile)
        data = accepted_head(
            job_id if self._store else None, self._date, close=close, arango=self._arango
        )
        try:
            # (non-blocking, as the transport set the socket: a client that does not
            # read never holds up the writer's thread, or the commits behind it)
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = len(data)  # the client is gone: the loop sees it too
        self.unsent = data[sent:]


def left(early: Early202 | None) -> bool:
    """Whether the 202 left from the writer's thread (whole, or what the kernel took)."""
    return early is not None and early.unsent is not None

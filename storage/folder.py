"""The data folder: created private, locked for one store, holding a 0600 database file.

An existing folder that group or others can write is refused (see `_refuse_shared`).

Job ids are allocated in memory by the one writer, so two stores on the same folder
would hand out the same ids; an exclusive ``flock`` on the folder makes the second
one fail at open instead. The kernel drops the lock when the process dies, even by
SIGKILL, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path

from storage.errors import StoreError

DATABASE_NAME = "jobs.sqlite3"

log = logging.getLogger(__name__)


class DataFolder:
    """A claimed data folder; release() gives it up."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self.database = path / DATABASE_NAME
        self._lock_fd: int | None = lock_fd

    @classmethod
    def claim(cls, path: Path) -> DataFolder:
        """Create the folder (0700) if missing, lock it, and make sure the database file
        (and its -wal and -shm) are 0600."""
        try:
            _make_folder(path)
        except OSError as exc:
            raise StoreError(f"cannot create the data folder {path}: {exc}") from exc
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot open the data folder {path}: {exc}") from exc
        try:
            _refuse_shared(path, os.fstat(fd))
        except StoreError:
            os.close(fd)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreError(
                f"the data folder {path} is in use by another job store (another proxy?)"
            ) from exc
        folder = cls(path, fd)
        try:
            folder._private_database_file()
        except OSError as exc:
            folder.release()
            raise StoreError(f"cannot prepare {folder.database}: {exc}") from exc
        except StoreError:
            folder.release()
            raise
        return folder

    def _private_database_file(self) -> None:
        # Create the file ourselves so it is never, even briefly, readable by others:
        # SQLite would create it 0644, and the -wal and -shm files it creates copy its
        # mode. Those a crash left behind keep theirs: they are tightened too.
        try:
            fd = os.open(self.database, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            status = os.stat(self.database)
            if not stat.S_ISREG(status.st_mode):
                raise StoreError(f"{self.database} is not a regular file") from None
            _tighten(self.database, status)
            for suffix in ("-wal", "-shm"):
                companion = self.database.with_name(DATABASE_NAME + suffix)
                with contextlib.suppress(FileNotFoundError):
                    _tighten(companion, os.lstat(companion))
            return
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None


def _make_folder(path: Path) -> None:
    """As ``mkdir -p``, but the folders made are never writable by group or others,
    whatever the umask: who can write a parent can swap the data folder for their own.
    The data folder itself is made 0700; an existing one keeps the mode its operator
    gave it."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made meanwhile, or a dangling symlink: opening it says
        # mkdir's mode is filtered by the umask: set it exactly. A parent: as the umask
        # left it, less the write bits of group and others, and all of the owner's.
        left = stat.S_IMODE(os.stat(folder).st_mode)
        os.chmod(folder, 0o700 if folder is missing[0] else left & ~0o022 | 0o700)


def _tighten(path: Path, status: os.stat_result) -> None:
    mode = stat.S_IMODE(status.st_mode)
    if stat.S_ISREG(status.st_mode) and mode & 0o077:
        log.warning("%s was mode %o; setting it to 0600", path, mode)
        os.chmod(path, 0o600)


def _refuse_shared(path: Path, status: os.stat_result) -> None:
    """A folder that others can write is not private, whatever its files' modes.

    Anyone who can write the folder can delete and replace the database, its -wal
    or -shm file (or plant a symlink before they exist) and so read or forge jobs
    and the credentials they carry. The proxy does not chmod an operator's folder
    behind their back: it refuses, and says how to fix it.
    """
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o022:
        raise StoreError(
            f"the data folder {path} is writable by group or others (mode {mode:04o}); "
            f"make it private, e.g. chmod 700 {path}"
        )

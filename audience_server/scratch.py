"""Scratch space: each worker process's own folder of temporary files, gone when it stops.

A process takes a folder under the scratch root and holds an exclusive ``flock`` on a file
in it for as long as it lives. The kernel drops that lock when the process dies, however
it dies (``kill -9`` included), so a starting process removes every folder whose lock it
can take: whatever killed processes left. Folders of live processes are never touched.

    <root>/.lock              held briefly while a process sweeps and takes its folder
    <root>/worker-XXXX/lock   held by its owner for its whole life
    <root>/worker-XXXX/...    the owner's files (duplicate detection's key sets)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("audience_server.scratch")

PREFIX = "worker-"


def default_root() -> Path:
    """``<temp dir>/audience-server``: the temp dir honours ``TMPDIR``."""
    return Path(tempfile.gettempdir()) / "audience-server"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # gone, or not ours to open
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Scratch:
    """This process's folder under a scratch root; ``close()`` removes it."""

    def __init__(self, root: Path, path: Path, lock_fd: int) -> None:
        self.root = root
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def take(cls, root: Path | None = None) -> Scratch:
        """Sweep what dead processes left under ``root``, then take a folder there."""
        root = root or default_root()
        # Sweeping and taking happen under one lock, so a folder is never seen between
        # its creation and its owner's lock.
        with _guard(root):
            swept = _sweep(root)
            path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
            lock = path / "lock"
            lock.touch(mode=0o600)
            fd = _try_lock(lock)
            assert fd is not None  # nobody else can know of this folder yet
        if swept:
            log.info("removed scratch folders of stopped workers", extra={"folders": swept})
        return cls(root, path, fd)

    def close(self) -> None:
        """Remove the folder and everything in it. Safe to call twice."""
        if self._lock_fd is None:
            return
        with _guard(self.root):
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = None
            # The last one out removes the root too: nothing is left in the temp dir.
            if not any(self.root.glob(f"{PREFIX}*")):
                (self.root / ".lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.root.rmdir()

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def _guard(root: Path) -> Iterator[None]:
    """Hold ``<root>/.lock``, creating the root if needed. A holder may remove the root
    and its lock file; a process that waited on the removed file tries again."""
    while True:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = root / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the root went away between mkdir and open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield
                return
        finally:
            os.close(fd)  # closing the fd releases the flock


def _sweep(root: Path) -> int:
    """Remove the folders under ``root`` whose owner has died; returns how many."""
    swept = 0
    for folder in root.glob(f"{PREFIX}*"):
        fd = _try_lock(folder / "lock")
        if fd is None and (folder / "lock").exists():
            continue  # alive
        try:
            shutil.rmtree(folder, ignore_errors=True)
            swept += 1
        finally:
            if fd is not None:
                os.close(fd)
    return swept


class LazyScratch:
    """A scratch folder taken on first use (thread-safe) and removed by ``close()``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self._scratch: Scratch | None = None
        self._lock = threading.Lock()

    def path(self) -> Path:
        with self._lock:
            if self._scratch is None:
                self._scratch = Scratch.take(self.root)
            return self._scratch.path

    def close(self) -> None:
        with self._lock:
            if self._scratch is not None:
                with contextlib.suppress(OSError):
                    self._scratch.close()
                self._scratch = None

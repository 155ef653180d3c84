"""``serve``'s delivery worker in a child process of its own, restarted when it dies.

Requests and deliveries then run in two interpreters: each has a core and a GIL of its
own, and an assembly's hashing never holds up a batch's 200. The child is ``audience-server
worker`` with a worker id that stays the same across restarts, so a new child takes back at
once what the dead one held (``Worker.run`` releases leases of its own id; nothing waits for
them to lapse). The two talk over a socket pair, one byte per message:

    server -> child   ``w``  new work may wait (a session completed, a retry was asked for)
    child -> server   ``c``  an assembly or a delivery ended (sync requests look again)

The child runs in a session of its own, so a terminal's Ctrl-C reaches only the server,
which then stops the child in order (SIGTERM, its grace, then SIGKILL); and it stops by
itself when its end of the socket closes, so a server killed with SIGKILL leaves no worker
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence

from .worker import Doorbell

log = logging.getLogger("audience_server")

WAKE = b"w"
CHANGED = b"c"


def worker_command() -> list[str]:
    """How to start ``audience-server worker`` with this interpreter and this package."""
    return [sys.executable, "-m", "audience_server", "worker"]


class WorkerSupervisor:
    """Runs the worker child until stopped, restarting it whenever it exits."""

    def __init__(
        self,
        changes: Doorbell,
        *,
        command: Sequence[str] | None = None,
        grace: float = 35.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.changes = changes  # rung when the child says an assembly or a delivery ended
        self.command = list(command or worker_command())
        self.id = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}:worker"
        self.grace = grace  # the child's own grace is 30 s; then it is killed
        self.backoff = backoff  # first and longest wait before a restart
        self.clock = clock
        self.pid: int | None = None  # the running child's
        self.restarts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None

    def wake(self) -> None:
        """Tell the child new work may wait; safe from any thread, lost if none runs."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._send_wake)

    def _send_wake(self) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(WAKE)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one child running until ``stop`` is set, then stop it."""
        self._loop = asyncio.get_running_loop()
        delay = self.backoff[0]
        while not stop.is_set():
            started = self.clock()
            code = await self._run_once(stop)
            if code is None:
                return  # stopped
            # A child that ran a while before dying starts again at once, one that dies as
            # it starts (a bad setting, the database away) ever more slowly.
            if self.clock() - started > 60:
                delay = self.backoff[0]
            log.error(
                "worker process exited; restarting it",
                extra={"exitCode": code, "restartIn": delay, "worker": self.id},
            )
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, self.backoff[1])

    async def _run_once(self, stop: asyncio.Event) -> int | None:
        """Run one child until it exits (its exit code) or ``stop`` is set (None)."""
        mine, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                "--worker-id",
                self.id,
                "--control-fd",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.pid = process.pid
        reader, self._writer = await asyncio.open_connection(sock=mine)
        listening = asyncio.create_task(self._listen(reader))
        exited = asyncio.create_task(process.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                return exited.result()
            await self._stop(process)
            return None
        finally:
            for task in (listening, stopping, exited):
                task.cancel()
            await asyncio.gather(listening, stopping, exited, return_exceptions=True)
            self._writer.close()
            self._writer = None
            self.pid = None

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(64):
            if CHANGED in data:
                self.changes.ring()

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL once the grace is over (its leases then lapse as usual)."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.grace)
        except TimeoutError:
            log.warning("worker process did not stop in time; killing it")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def attach_to_supervisor(
    fd: int, wake: Callable[[], None], changes: Doorbell, stop: asyncio.Event
) -> socket.socket:
    """The child's end: ``w`` wakes the worker, each ring of ``changes`` sends ``c``, and
    the server's end closing (it exited or was killed) sets ``stop``."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sock)
            stop.set()
        elif WAKE in data:
            wake()

    def changed() -> None:
        with contextlib.suppress(OSError):  # full or closed: the server polls anyway
            sock.send(CHANGED)

    loop.add_reader(sock, readable)
    changes.subscribe(changed)
    return sock

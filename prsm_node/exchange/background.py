"""A thread of its own at a lower CPU priority, for the bulk work beside a transfer: hashing
and writing received chunks (fetch.py), reading chunks to serve (service.py).

On a loaded machine the trio loop of each side of a transfer is its bottleneck, and worker
threads that preempt it slow the transfer: measured (256 MiB, 2 cores, 1 provider), the
fetcher's loop waited 0.3-0.6 s runnable for a CPU against 0.07 s for a bare py-libp2p
stream, about the CPU time of the fetcher's hash-and-write threads and the provider's read
threads. Run at ``nice`` +:data:`LOW_PRIORITY`, that work takes the CPU time the loops leave
(each loop is blocked part of the time) instead of theirs; the work is the same. A thread of
its own, not trio's shared thread cache: a nice value cannot be lowered again without
privileges, and other blocking calls of the node (the ledger's, consensus') must keep
theirs. Where ``os.setpriority`` is missing or refused the thread runs at normal priority.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
LOW_PRIORITY = 10  # nice increment of the thread


class LowPriorityThread:
    """Runs blocking calls for trio tasks, one at a time in the order given, in one thread at
    nice +LOW_PRIORITY, started at the first call. ``close()`` ends the thread after the calls
    given so far. A task cancelled while its call runs waits for the call (like
    ``trio.to_thread.run_sync``'s default)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Callable[[], None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.niced = False

    def _main(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
            self.niced = True
        except (AttributeError, OSError):
            pass
        while (call := self._calls.get()) is not None:
            call[0]()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def call() -> None:
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the loop ended meanwhile: nobody waits
                pass

        self._calls.put((call,))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None

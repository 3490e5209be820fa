"""The device thread: one worker thread that runs the runtime's batches in submission order.

``trio.to_thread.run_sync`` hands each call to an idle thread and wakes it; between two
batches the device would wait for that hand-off (and, on a busy machine, for the OS to
schedule the woken thread). Here the runtime submits the next batch while the current one
runs, and the thread goes from one to the next without waiting for the event loop. Results go
back through the trio token; the awaiting task cannot cancel a batch already submitted (as
with ``to_thread.run_sync``), so the device is never left mid-batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio


class DeviceThread:
    def __init__(self, name: str = "prsm-device") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the device thread, after every batch submitted before it."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[Any]] = []

        def deliver(result: outcome.Outcome[Any]) -> None:
            box.append(result)
            done.set()

        def job() -> None:
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:  # the event loop is gone: nobody waits for it
                pass

        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(job)
        with trio.CancelScope(shield=True):  # a submitted batch always runs to its end
            await done.wait()
        return box[0].unwrap()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    def close(self) -> None:
        """Let the thread end once the batches already submitted have run."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

"""The device thread: one worker thread that runs the runtime's batches in submission order.

``trio.to_thread.run_sync`` hands each call to an idle thread and wakes it; between two
batches the device would wait for that hand-off (and, on a busy machine, for the OS to
schedule the woken thread). Here the runtime submits the next batch while the current one
runs, and the thread goes from one to the next without waiting for the event loop. Results go
back through the trio token; the awaiting task cannot cancel a batch already submitted (as
with ``to_thread.run_sync``), so the device is never left mid-batch.

Every wake-up of the event loop costs the forward passes time: the loop's thread competes with
the device thread for the core and the GIL while it runs. So results are handed back
together: a finished job whose successors are already queued waits for them, until nothing
is queued or the oldest held job started ``HOLD_S`` ago (a result is late by at most
``HOLD_S`` and one job; a job with nothing queued behind it, or one longer than ``HOLD_S``,
is delivered at once). Measured in paired rounds of the runtime's batched path against a bare
forward loop (embedder, 20 batches of 16 texts, 60 rounds, 2 cores): 0.83-0.87 of bare with
per-job delivery, 0.88-0.91 with two jobs' results per wake-up. Holding by time instead, with
up to 8 batches a job (``runtime.BATCHES_PER_JOB``), a burst of 10 batches is handed back once
rather than twice: against the bare loop on this same thread, 0.91-0.92 became 0.94-0.95 (three
paired runs of 60-80 rounds, 10 batches each).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import outcome
import trio

HOLD_S = 0.1  # seconds a finished job's results may wait for the jobs queued behind it

_Finished = tuple[trio.lowlevel.TrioToken, Callable[[], None]]  # a job's event loop and its delivery


class DeviceThread:
    def __init__(self, name: str = "prsm-device") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], _Finished] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the device thread, after every batch submitted before it."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[Any]] = []

        def deliver(result: outcome.Outcome[Any]) -> None:
            box.append(result)
            done.set()

        def job() -> _Finished:
            result = outcome.capture(fn, *args)
            return token, lambda: deliver(result)

        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(job)
        with trio.CancelScope(shield=True):  # a submitted batch always runs to its end
            await done.wait()
        return box[0].unwrap()

    def _loop(self) -> None:
        held: list[_Finished] = []
        since = 0.0  # when the oldest held job started
        while True:
            job = self._jobs.get()
            if job is None:
                _hand_back(held)
                return
            if not held:
                since = time.monotonic()
            held.append(job())
            if self._jobs.empty() or time.monotonic() - since >= HOLD_S:
                _hand_back(held)
                held = []

    def close(self) -> None:
        """Let the thread end once the batches already submitted have run."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


def _hand_back(held: list[_Finished]) -> None:
    """Run the deliveries of finished jobs in their event loops, one wake-up per loop."""
    by_token: dict[trio.lowlevel.TrioToken, list[Callable[[], None]]] = {}
    for token, deliver in held:
        by_token.setdefault(token, []).append(deliver)
    for token, delivers in by_token.items():
        try:
            token.run_sync_soon(_run_all, delivers)
        except trio.RunFinishedError:  # the event loop is gone: nobody waits for these
            pass


def _run_all(delivers: list[Callable[[], None]]) -> None:
    for deliver in delivers:
        deliver()

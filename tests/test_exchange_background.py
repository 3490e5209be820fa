"""The low-priority thread beside a transfer: calls run in order in one thread of their own, at
a higher nice value than the loop's, their results and exceptions come back to the caller,
and after ``close`` a later call starts a thread anew."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from prsm_node.exchange.background import LOW_PRIORITY, LowPriorityThread


def whoami(tag: str) -> tuple[str, int, int]:
    tid = threading.get_native_id()
    return tag, tid, os.getpriority(os.PRIO_PROCESS, tid)


async def test_calls_run_in_order_in_a_niced_thread_and_results_and_errors_come_back() -> None:
    worker = LowPriorityThread("test bulk")
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    order: list[int] = []
    got: dict[int, tuple[str, int, int]] = {}

    async def call(i: int) -> None:
        got[i] = await worker.run(lambda: (order.append(i), whoami(f"call {i}"))[1])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()  # each call queued before the next
        assert order == list(range(5))
        threads = {tid for _, tid, _ in got.values()}
        assert len(threads) == 1 and threading.get_native_id() not in threads
        assert worker.niced and all(nice == min(loop_nice + LOW_PRIORITY, 19) for _, _, nice in got.values())

        def fail() -> None:
            raise ValueError("disk on fire")

        with pytest.raises(ValueError, match="disk on fire"):
            await worker.run(fail)
        worker.close()
        assert await worker.run(lambda: threading.current_thread().name) == "test bulk"  # a thread anew
        worker.close()

"""The device thread: batches run in submission order, results reach their callers, and
finished results are handed back to the event loop together (fewer wake-ups of the loop)."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from prsm_node.agents import device as device_module
from prsm_node.agents.device import DeviceThread


async def _submit_behind_a_gate(dt: DeviceThread, nursery: trio.Nursery, n: int, order: list[int],
                                results: dict[int, int], gate: threading.Event) -> None:
    """Job 0 waits for ``gate``; jobs 1..n-1 are queued behind it."""

    def work(i: int) -> int:
        if i == 0:
            gate.wait(10)
        order.append(i)
        return i * i

    async def one(i: int) -> None:
        results[i] = await dt.run(work, i)

    for i in range(n):
        nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()  # submitted in this order


async def test_jobs_run_in_order_and_every_caller_gets_its_result() -> None:
    dt = DeviceThread()
    order: list[int] = []
    results: dict[int, int] = {}
    gate = threading.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _submit_behind_a_gate(dt, nursery, 7, order, results, gate)
            gate.set()
    dt.close()
    assert order == list(range(7))
    assert results == {i: i * i for i in range(7)}


async def _handed_back(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """How many results each wake-up of the loop delivered, for ``n`` jobs queued together."""
    handed: list[int] = []
    real = device_module._run_all

    def counting(delivers: list) -> None:  # type: ignore[type-arg]
        handed.append(len(delivers))
        real(delivers)

    monkeypatch.setattr(device_module, "_run_all", counting)
    dt = DeviceThread()
    results: dict[int, int] = {}
    gate = threading.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _submit_behind_a_gate(dt, nursery, n, [], results, gate)
            gate.set()
    dt.close()
    assert results == {i: i * i for i in range(n)}
    return handed


async def test_results_of_queued_jobs_are_handed_back_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "HOLD_S", 60.0)
    assert await _handed_back(monkeypatch, 5) == [5]  # one wake-up once nothing is queued, not one per job


async def test_held_results_wait_at_most_hold_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "HOLD_S", 0.0)  # every job is older than that when it ends
    assert await _handed_back(monkeypatch, 3) == [1, 1, 1]


async def test_a_held_result_is_delivered_when_the_thread_closes() -> None:
    dt = DeviceThread()
    results: dict[int, int] = {}
    gate = threading.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _submit_behind_a_gate(dt, nursery, 1, [], results, gate)
            dt.close()  # queued behind the running job: the job finishes with something queued
            gate.set()
    assert results == {0: 0}


async def test_a_failing_job_fails_its_caller_only() -> None:
    dt = DeviceThread()

    def boom() -> None:
        raise ValueError("device out of memory")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def bad() -> None:
                with pytest.raises(ValueError, match="out of memory"):
                    await dt.run(boom)
                got.append("raised")

            async def good() -> None:
                got.append(await dt.run(lambda: 42))

            nursery.start_soon(bad)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(good)
    dt.close()
    assert sorted(map(str, got)) == ["42", "raised"]

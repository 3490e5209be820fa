"""Signature checks off the event loop, in batches, on another core.

Ed25519 verification is most of what admitting or replaying a tx costs (~65 us each).
libsodium runs without the GIL, but every check also needs a few microseconds of Python, and
a worker *thread* that needs the GIL back while the event loop is busy waits for the loop's
switch interval: measured, thread verification beside a busy loop ran little faster than
doing both in turn. So large batches (a synced block, a burst of submissions) go to a worker
*process* with its own interpreter (``python -m prsm_node.ledger.verify_worker``, started on
first need, talking over its stdin/stdout, gone when its stdin closes); middle-sized batches,
and any batch when that process cannot run, go to a thread; a batch of a few signatures is
checked on the event loop, where it costs less than either hand-off. Submissions queue here; one worker
call takes every queued tx at once.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import sys

import msgpack
import trio

from .._trio import TaskStatus
from ..ledger.batchverify import Triple, triples_of, verify_triples
from ..ledger.types import Tx
from ..logs import kv

log = logging.getLogger(__name__)

MAX_BATCH = 4096
# Batches this large (in signatures; ~4 ms of checks) go to the worker process; smaller ones to a thread,
# where the hand-off costs less than the checks.
PROCESS_MIN_BATCH = 64
# Batches this small are checked on the event loop (at most ~0.4 ms): a hand-off to a thread or
# the process costs ~300 us of CPU (measured: one signature 80 us inline, 375 us through a
# thread, 445 us through the process), which at low load made each 1-2-tx submission cost
# several times its checks.
INLINE_MAX_BATCH = 4


def signatures_valid(tx: Tx) -> bool:
    """The sender's signature and, for a settlement, every payer's receipt signature."""
    return all(verify_triples(triples_of(tx)))


class _Request:
    """One caller's txs (one, or a whole submission) and, once checked, a verdict per tx."""

    __slots__ = ("txs", "done", "ok")

    def __init__(self, txs: list[Tx]) -> None:
        self.txs = txs
        self.done = trio.Event()
        self.ok: list[bool] = []


class SignatureVerifier:
    def __init__(self, *, use_process: bool = True) -> None:
        self._queue: list[_Request] = []
        self._wake = trio.Event()
        self._use_process = use_process
        self._worker: _Worker | None = None
        self._starting = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.batches = 0
        self.verified = 0
        self.in_process = 0
        self.inline = 0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    while self._queue:
                        # One batch at a time: submissions that arrive meanwhile make the next
                        # batch larger, which is what keeps the per-batch overhead small.
                        take, size = 0, 0
                        while take < len(self._queue) and (not take or size + len(self._queue[take].txs) <= MAX_BATCH):
                            size += len(self._queue[take].txs)
                            take += 1
                        batch, self._queue = self._queue[:take], self._queue[take:]
                        await self._answer(batch)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def _answer(self, batch: list[_Request]) -> None:
        results = await self._check_batch([tx for r in batch for tx in r.txs])
        at = 0
        for request in batch:
            request.ok = results[at : at + len(request.txs)]
            at += len(request.txs)
            request.done.set()
        self.batches += 1

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.aclose()

    async def verify(self, tx: Tx) -> bool:
        """True when every signature in ``tx`` verifies."""
        return (await self.verify_many([tx]))[0]

    async def first_invalid(self, txs: list[Tx]) -> int | None:
        """The index of the first tx whose signatures fail, or None (a block's txs; checked
        at once, beside the queue, so a synced block's check pipelines with the next one's)."""
        results = await self._check_batch(txs)
        return next((i for i, ok in enumerate(results) if not ok), None)

    async def verify_many(self, txs: list[Tx]) -> list[bool]:
        """Per tx, True when every signature in it verifies; checked as one batch."""
        if not txs:
            return []
        request = _Request(list(txs))  # queued: concurrent submissions batch up
        self._queue.append(request)
        self._wake.set()
        await request.done.wait()
        return request.ok

    async def _check_batch(self, txs: list[Tx]) -> list[bool]:
        per_tx = [triples_of(tx) for tx in txs]
        triples = [t for ts in per_tx for t in ts]
        results = await self._verify(triples)
        self.verified += len(triples)
        out, i = [], 0
        for ts in per_tx:
            out.append(all(results[i : i + len(ts)]))
            i += len(ts)
        return out

    async def _verify(self, triples: list[Triple]) -> list[bool]:
        if len(triples) <= INLINE_MAX_BATCH:
            self.inline += len(triples)
            return verify_triples(triples)
        if self._use_process and self._nursery is not None and len(triples) >= PROCESS_MIN_BATCH:
            try:
                async with self._starting:
                    if self._worker is None or self._worker.failed:
                        await self.aclose()  # reap a failed one
                        self._worker = await _Worker.start(self._nursery)
                    worker = self._worker
                results = await worker.verify(triples)
                self.in_process += len(triples)
                return results
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _WorkerError) as exc:
                # The next large batch starts a new worker; this one is checked in a thread.
                log.warning("verifier process failed; checking signatures in a thread", extra=kv(error=repr(exc)))
        return await trio.to_thread.run_sync(verify_triples, triples)


class _WorkerError(Exception):
    """Raised when the worker process answers out of protocol or exits."""


class _Pending:
    __slots__ = ("count", "done", "results", "error")

    def __init__(self, count: int) -> None:
        self.count = count
        self.done = trio.Event()
        self.results: list[bool] = []
        self.error: str | None = None


class _Worker:
    """One ``verify_worker`` process. Requests are pipelined: each is written as soon as it
    comes (the worker reads the next while it checks this one), and a reader task hands the
    answers back in order, so the worker never waits for the event loop between requests.
    A request cut off halfway (cancelled while being written) puts the pipe out of step:
    the worker is then failed, and its callers fall back to a thread."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._send_lock = trio.Lock()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._failed: str | None = None

    @classmethod
    async def start(cls, nursery: trio.Nursery) -> _Worker:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "prsm_node.ledger.verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        worker = cls(process)
        nursery.start_soon(worker._read_answers)
        return worker

    @property
    def failed(self) -> bool:
        return self._failed is not None

    async def verify(self, triples: list[Triple]) -> list[bool]:
        assert self._process.stdin is not None
        body = msgpack.packb(triples)  # tuples pack as arrays
        entry = _Pending(len(triples))
        async with self._send_lock:
            if self._failed is not None:
                raise _WorkerError(self._failed)
            self._pending.append(entry)
            try:
                await self._process.stdin.send_all(len(body).to_bytes(4, "big") + body)
            except BaseException as exc:
                self._fail(f"writing a request failed: {exc!r}")
                raise
        await entry.done.wait()
        if entry.error is not None:
            raise _WorkerError(entry.error)
        return entry.results

    async def _read_answers(self) -> None:
        try:
            while True:
                size = int.from_bytes(await self._read(4), "big")
                if not self._pending or size != self._pending[0].count:
                    raise _WorkerError(f"the worker answered {size} results out of turn")
                answer = await self._read(size)
                entry = self._pending.popleft()
                entry.results = [b == 1 for b in answer]
                entry.done.set()
        except (_WorkerError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(str(exc))

    def _fail(self, why: str) -> None:
        if self._failed is None:
            self._failed = why
        while self._pending:
            entry = self._pending.popleft()
            entry.error = self._failed
            entry.done.set()

    async def _read(self, n: int) -> bytes:
        assert self._process.stdout is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = await self._process.stdout.receive_some(n - len(buf))
            if not chunk:
                raise _WorkerError("the worker exited")
            buf += chunk
        return bytes(buf)

    async def aclose(self) -> None:
        """Close its stdin (it exits at end of input) and reap it; kill it if it lingers."""
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        self._fail("the verifier is closing")
        await process.stdin.aclose()
        with trio.move_on_after(2) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()
        await process.stdout.aclose()

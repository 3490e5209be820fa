"""Signature checks off the event loop, in batches, on another core.

Ed25519 verification is most of what admitting or replaying a tx costs (~65 us each).
libsodium runs without the GIL, but every check also needs a few microseconds of Python, and
a worker *thread* that needs the GIL back while the event loop is busy waits for the loop's
switch interval: measured, thread verification beside a busy loop ran little faster than
doing both in turn. So large batches (a synced block, a burst of submissions) go to a worker
*process* with its own interpreter (``python -m prsm_node.ledger.verify_worker``, started on
first need, talking over its stdin/stdout, gone when its stdin closes); small batches, and
any batch when that process cannot run, go to a thread. Submissions queue here; one worker
call takes every queued tx at once.
"""

from __future__ import annotations

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
# Batches this large (in signatures) go to the worker process; smaller ones to a thread,
# where the hand-off costs less than the checks.
PROCESS_MIN_BATCH = 256


def signatures_valid(tx: Tx) -> bool:
    """The sender's signature and, for a settlement, every payer's receipt signature."""
    return all(verify_triples(triples_of(tx)))


class _Request:
    __slots__ = ("tx", "done", "ok")

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self.done = trio.Event()
        self.ok = False


class SignatureVerifier:
    def __init__(self, *, use_process: bool = True) -> None:
        self._queue: list[_Request] = []
        self._wake = trio.Event()
        self._use_process = use_process
        self._worker: _Worker | None = None
        self._starting = trio.Lock()
        self.batches = 0
        self.verified = 0
        self.in_process = 0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._queue:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                    results = await self._check([r.tx for r in batch])
                    for request, ok in zip(batch, results, strict=True):
                        request.ok = ok
                        request.done.set()
                    self.batches += 1
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.aclose()

    async def verify(self, tx: Tx) -> bool:
        """True when every signature in ``tx`` verifies."""
        request = _Request(tx)
        self._queue.append(request)
        self._wake.set()
        await request.done.wait()
        return request.ok

    async def first_invalid(self, txs: list[Tx]) -> int | None:
        """The index of the first tx whose signatures fail, or None (a block's txs)."""
        results = await self._check(txs)
        return next((i for i, ok in enumerate(results) if not ok), None)

    async def _check(self, txs: list[Tx]) -> list[bool]:
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
        if self._use_process and len(triples) >= PROCESS_MIN_BATCH:
            try:
                async with self._starting:
                    if self._worker is None:
                        self._worker = await _Worker.start()
                    worker = self._worker
                results = await worker.verify(triples)
                self.in_process += len(triples)
                return results
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _WorkerError) as exc:
                log.warning("verifier process failed; checking signatures in a thread", extra=kv(error=repr(exc)))
                await self.aclose()
        return await trio.to_thread.run_sync(verify_triples, triples)


class _WorkerError(Exception):
    """Raised when the worker process answers out of protocol or exits."""


class _Worker:
    """One ``verify_worker`` process; one request at a time. A request interrupted halfway
    (cancelled) leaves the pipe out of step, so the worker is then killed and replaced."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._lock = trio.Lock()
        self._broken = False

    @classmethod
    async def start(cls) -> _Worker:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "prsm_node.ledger.verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return cls(process)

    async def verify(self, triples: list[Triple]) -> list[bool]:
        async with self._lock:
            if self._broken:
                raise _WorkerError("the worker was interrupted mid-request")
            assert self._process.stdin is not None and self._process.stdout is not None
            body = msgpack.packb([list(t) for t in triples])
            self._broken = True  # until the whole answer is in
            await self._process.stdin.send_all(len(body).to_bytes(4, "big") + body)
            size = int.from_bytes(await self._read(4), "big")
            if size != len(triples):
                raise _WorkerError(f"the worker answered {size} results for {len(triples)} checks")
            answer = await self._read(size)
            self._broken = False
            return [b == 1 for b in answer]

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
        await process.stdin.aclose()
        with trio.move_on_after(2) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()
        await process.stdout.aclose()

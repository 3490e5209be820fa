"""Signature checks off the event loop, in batches.

Ed25519 verification is most of what admitting a tx costs (~70-100 us each). libsodium
releases the GIL, so a worker thread verifies while the event loop decodes, admits and makes
blocks. Submissions queue here; one worker call takes every queued tx at once, so under load
the cost of the thread hand-off is spread over hundreds of txs.
"""

from __future__ import annotations

import trio

from .._trio import TaskStatus
from ..ledger.signing import verify_receipt_signature, verify_tx_signature
from ..ledger.types import Settle, Tx

MAX_BATCH = 1024


def signatures_valid(tx: Tx) -> bool:
    """The sender's signature and, for a settlement, every payer's receipt signature."""
    if not verify_tx_signature(tx):
        return False
    return not isinstance(tx.body, Settle) or all(verify_receipt_signature(r) for r in tx.body.receipts)


def _verify_batch(txs: list[Tx]) -> list[bool]:
    return [signatures_valid(tx) for tx in txs]


class _Request:
    __slots__ = ("tx", "done", "ok")

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self.done = trio.Event()
        self.ok = False


class SignatureVerifier:
    def __init__(self) -> None:
        self._queue: list[_Request] = []
        self._wake = trio.Event()
        self.batches = 0
        self.verified = 0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                results = await trio.to_thread.run_sync(_verify_batch, [r.tx for r in batch])
                for request, ok in zip(batch, results, strict=True):
                    request.ok = ok
                    request.done.set()
                self.batches += 1
                self.verified += len(batch)

    async def verify(self, tx: Tx) -> bool:
        """True when every signature in ``tx`` verifies."""
        request = _Request(tx)
        self._queue.append(request)
        self._wake.set()
        await request.done.wait()
        return request.ok

    async def first_invalid(self, txs: list[Tx]) -> int | None:
        """The index of the first tx whose signatures fail, or None (a block's txs)."""
        results = await trio.to_thread.run_sync(_verify_batch, txs)
        return next((i for i, ok in enumerate(results) if not ok), None)

"""Receipts this node holds and their settlement on the ledger.

Two queues, both persisted in the node's LevelDB (namespace ``agents``) so a restart loses no
money:

- **to settle**: receipts whose payee is this node (an executor's share, a publisher's
  royalty). The settle loop batches them into ``Settle`` txs (signed by this node, the payee),
  at most ``MAX_RECEIPTS`` per tx, only receipts whose payer's balance covers them, and drops a
  receipt once the ledger says it is settled.
- **to forward**: royalty receipts an executor collected for a model's publisher. The forward
  loop delivers them to the publisher's node over ``/prsm/task/1.0.0`` (DELIVER) and retries
  until the publisher accepts them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .._trio import TaskStatus
from ..ledger.codec import MAX_RECEIPTS, decode_receipt, encode_receipt
from ..ledger.exceptions import LedgerDecodeError, TxRejected
from ..ledger.state import receipt_key
from ..ledger.types import Receipt, Settle
from ..logs import kv

log = logging.getLogger(__name__)

SETTLE_PREFIX = b"s/"
FORWARD_PREFIX = b"f/"
MAX_HELD = 100_000
COMMIT_TIMEOUT = 30.0

Deliver = Callable[[bytes, list[Receipt]], Awaitable[int]]  # (publisher account, receipts) -> accepted


class Settler:
    def __init__(self, namespace: Any, chain_net: Any, *, account: bytes, deliver: Deliver,
                 interval: float = 1.0, fee: int = 0) -> None:
        self.ns = namespace
        self.chain_net = chain_net
        self.account = account
        self.deliver = deliver
        self.interval = interval
        self.fee = fee
        self.to_settle: dict[bytes, Receipt] = {}
        self.to_forward: dict[bytes, Receipt] = {}
        self.settled_count = 0
        self.settled_amount = 0
        self.forwarded_count = 0
        self.settle_txs = 0
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._pending: list[tuple[bytes, bytes]] = []  # receipt writes not yet on disk
        self._write_lock = trio.Lock()

    # ------------------------------------------------------------ queues

    def _load(self) -> None:
        for key, value in self.ns.items():
            try:
                r = decode_receipt(value)
            except LedgerDecodeError:
                continue
            if key.startswith(SETTLE_PREFIX):
                self.to_settle[receipt_key(r.payer, r.receipt_id)] = r
            elif key.startswith(FORWARD_PREFIX):
                self.to_forward[receipt_key(r.payer, r.receipt_id)] = r

    async def add(self, receipts: list[Receipt]) -> int:
        """Hold checked receipts: this node's to settle, others' to forward. Returns how many
        were new, once they are on disk (a synced write, in a worker thread: an fsync on the
        event loop would stall every task of this node)."""
        writes: list[tuple[bytes, bytes]] = []
        for r in receipts:
            key = receipt_key(r.payer, r.receipt_id)
            mine = r.payee == self.account
            queue = self.to_settle if mine else self.to_forward
            if key in queue or len(self.to_settle) + len(self.to_forward) >= MAX_HELD:
                continue
            queue[key] = r
            writes.append(((SETTLE_PREFIX if mine else FORWARD_PREFIX) + key, encode_receipt(r)))
        if writes:
            self._pending += writes
            async with self._write_lock:  # group commit: one synced batch for every add waiting here
                if self._pending:  # else an earlier holder's batch held these writes too
                    batch, self._pending = self._pending, []
                    try:
                        await trio.to_thread.run_sync(self._write, batch)
                    except BaseException:
                        self._pending = batch + self._pending  # the next add writes them
                        raise
            self._wakeup.set()
        return len(writes)

    def _write(self, writes: list[tuple[bytes, bytes]]) -> None:
        with self.ns.write_batch(sync=True) as batch:
            for key, value in writes:
                batch.put(key, value)

    def _drop(self, prefix: bytes, queue: dict[bytes, Receipt], keys: list[bytes]) -> None:
        if not keys:
            return
        # not synced: a delete lost in a crash only brings back a settled (skipped) or delivered
        # (accepted again, idempotently) receipt; an fsync here would stall the event loop
        with self.ns.write_batch(sync=False) as batch:
            for key in keys:
                queue.pop(key, None)
                batch.delete(prefix + key)

    def owed_by(self, payer: bytes) -> int:
        """What ``payer`` owes through receipts held here and not settled yet."""
        return sum(r.amount for r in (*self.to_settle.values(), *self.to_forward.values()) if r.payer == payer)

    def held(self) -> int:
        return len(self.to_settle) + len(self.to_forward)

    # ------------------------------------------------------------ service

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self._load)
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.settle_once()
            await self.forward_once()
            if not self.held():
                self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until every held receipt is settled and every royalty delivered."""
        while self.held():
            self._idle = trio.Event()
            self._wakeup.set()
            await self._idle.wait()

    def _batch(self) -> list[Receipt]:
        """Receipts to settle now: not settled yet, each payer's total within its balance."""
        state = self.chain_net.chain.state
        done = [k for k, r in self.to_settle.items() if state.is_settled(r.payer, r.receipt_id)]
        self._drop(SETTLE_PREFIX, self.to_settle, done)
        spent: dict[bytes, int] = {}
        batch: list[Receipt] = []
        for r in self.to_settle.values():
            total = spent.get(r.payer, 0) + r.amount
            if total > state.account(r.payer).balance:
                continue  # the payer cannot cover it now; it waits (and keeps its debt visible)
            spent[r.payer] = total
            batch.append(r)
            if len(batch) == MAX_RECEIPTS:
                break
        return batch

    async def settle_once(self) -> None:
        batch = self._batch()
        if not batch:
            return
        try:
            entry = await self.chain_net.submit(body=Settle(tuple(batch)), fee=self.fee)
        except TxRejected as exc:
            log.info("settle refused", extra=kv(receipts=len(batch), code=exc.code, error=str(exc)))
            return
        self.settle_txs += 1
        with trio.move_on_after(COMMIT_TIMEOUT):
            await self.chain_net.chain.wait_committed(entry.hash)
        state = self.chain_net.chain.state
        done = [receipt_key(r.payer, r.receipt_id) for r in batch if state.is_settled(r.payer, r.receipt_id)]
        self.settled_count += len(done)
        self.settled_amount += sum(r.amount for r in batch if state.is_settled(r.payer, r.receipt_id))
        self._drop(SETTLE_PREFIX, self.to_settle, done)
        log.info("receipts settled", extra=kv(count=len(done), tx=entry.hash.hex()[:16]))

    async def forward_once(self) -> None:
        by_payee: dict[bytes, list[tuple[bytes, Receipt]]] = {}
        for key, r in self.to_forward.items():
            by_payee.setdefault(r.payee, []).append((key, r))
        for payee, items in by_payee.items():
            try:
                await self.deliver(payee, [r for _, r in items])
            except Exception as exc:  # the publisher may be offline: retried next round
                log.info("royalty delivery failed", extra=kv(publisher=payee.hex()[:16], error=repr(exc)))
                continue
            self.forwarded_count += len(items)
            self._drop(FORWARD_PREFIX, self.to_forward, [k for k, _ in items])

    def statistics(self) -> dict[str, int]:
        return {
            "receipts_to_settle": len(self.to_settle),
            "receipts_to_forward": len(self.to_forward),
            "receipts_settled": self.settled_count,
            "amount_settled": self.settled_amount,
            "royalties_forwarded": self.forwarded_count,
            "settle_txs": self.settle_txs,
        }

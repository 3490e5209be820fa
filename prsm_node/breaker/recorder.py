"""Validators record the breaker votes they accept as ledger transactions (kind BreakerVote,
protocols/ledger.md), so the history of halts is consensus-ordered and auditable.

One validator is *designated* for each vote (``vote_id mod n`` in genesis validator order) and
submits it at once; validator ``k`` places after it submits it only if the ledger has not
recorded it ``k * fallback_delay`` seconds later (the designated one is down or lagging), so
the ledger normally sees each vote once. A duplicate that still happens is harmless: the
mempool refuses a second pending tx for the same vote, and ``apply`` rejects one whose epoch
the ledger already holds (``stale_vote``); its sender's later txs are dropped with it and the
recorder submits what is still unrecorded again.

The queue is bounded (MAX_QUEUE votes); at most the mempool's per-sender limit is pending at
once, so a burst is recorded over a few blocks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..ledger.exceptions import DuplicateTx, MempoolFull, TooManyPending, TxRejected
from ..ledger.types import BreakerVote
from ..logs import kv
from .votes import Vote, encode_vote

log = logging.getLogger(__name__)

FALLBACK_DELAY = 15.0  # s: validator k after the designated one submits after k times this
MAX_QUEUE = 100_000
POLL = 0.5  # s between passes while votes wait to be recorded

SubmitTx = Callable[..., Awaitable[Any]]


class LedgerRecorder:
    def __init__(self, chain: Any, submit_tx: SubmitTx, *, fallback_delay: float = FALLBACK_DELAY) -> None:
        self.chain = chain
        self.submit_tx = submit_tx
        self.fallback_delay = fallback_delay
        order = list(chain.validator_order)
        self._n = len(order)
        self._me = order.index(chain.account) if chain.account in order else -1
        self._queue: dict[bytes, tuple[Vote, float]] = {}  # model || voter -> (latest vote, due time)
        self._pending: dict[bytes, bytes] = {}  # model || voter -> hash of our tx in the mempool
        self._wake = trio.Event()
        self.submitted = 0
        self.recorded = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self._me >= 0

    def rank(self, vote: Vote) -> int:
        """0 for the designated validator of this vote, k for the k-th fallback."""
        designated = int.from_bytes(hashlib.sha256(encode_vote(vote)).digest()[:8], "big") % self._n
        return (self._me - designated) % self._n

    def add(self, vote: Vote) -> None:
        """Queue an accepted vote for recording (replacing an older vote of the same key)."""
        if not self.enabled:
            return
        key = vote.model + vote.voter
        if key not in self._queue and len(self._queue) >= MAX_QUEUE:
            self.dropped += 1
            log.warning("breaker vote not queued for the ledger: the recorder queue is full")
            return
        self._queue[key] = (vote, trio.current_time() + self.rank(vote) * self.fallback_delay)
        self._wake.set()

    def statistics(self) -> dict[str, int]:
        return {
            "record_queue": len(self._queue),
            "record_submitted": self.submitted,
            "record_recorded": self.recorded,
            "record_dropped": self.dropped,
        }

    async def run(self) -> None:
        while True:
            if not self._queue:
                await self._wake.wait()
            self._wake = trio.Event()
            await self._pass()
            with trio.move_on_after(POLL):
                await self._wake.wait()

    async def _pass(self) -> None:
        state = self.chain.state
        mempool = self.chain.mempool
        now = trio.current_time()
        for key, (vote, due) in sorted(self._queue.items(), key=lambda item: item[1][1]):
            record = state.vote_record(vote.model, vote.voter)
            if record is not None and record.vote.epoch >= vote.epoch:
                self._forget(key)
                self.recorded += 1
                continue
            if due > now:
                break  # sorted by due time
            digest = self._pending.get(key)
            if digest is not None and digest in mempool:
                continue
            try:
                entry = await self.submit_tx(body=BreakerVote(vote), fee=state.params.min_fee)
            except (TooManyPending, MempoolFull):
                return  # a block will make room
            except DuplicateTx:
                continue  # another tx for this vote is pending here; see after the next block
            except TxRejected as exc:
                # The voter lost its stake, the ledger holds a newer vote, the fee is not covered...
                log.info("breaker vote not recorded", extra=kv(voter=vote.voter.hex()[:16], error=str(exc)))
                self._forget(key)
                self.dropped += 1
                continue
            self._pending[key] = entry.hash
            self.submitted += 1

    def _forget(self, key: bytes) -> None:
        self._queue.pop(key, None)
        self._pending.pop(key, None)

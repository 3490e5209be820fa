"""The mempool: signed transactions waiting for a block, checked before they are admitted.

Admission checks the encoding, chain id, signature, nonce and balance against the committed
state *plus the sender's own pending txs* (so a sender can queue several txs in a row). Each
sender's pending txs have contiguous nonces starting at its account nonce, so arrival order
is nonce order per sender and a block takes txs first-come first-served. A pending tx is
never replaced; a duplicate is dropped. The pool is bounded in total and per sender; when
full, a tx with a higher fee evicts the lowest-fee tx that ends some sender's queue (never
one in the middle, which would strand its successors).

A BreakerVote is also deduplicated by its vote: while a tx recording voter V's vote on model
M with epoch e is pending, another one for (M, V) with an epoch <= e is a duplicate (several
validators submit the same gossiped vote). After a block, a pending BreakerVote whose vote the
ledger has recorded (or superseded) meanwhile is dropped with its sender's later txs.

Not thread-safe and not async: the ledger service calls it from the event loop only, between
blocks (the state must be at a checkpoint).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..breaker.votes import verify_vote
from .codec import encode_tx, tx_hash
from .exceptions import (
    AmountOutOfRange,
    BadNonce,
    BadSignature,
    DuplicateTx,
    FeeTooLow,
    InsufficientFunds,
    InsufficientStake,
    MalformedTx,
    MempoolFull,
    TooManyPending,
    TxRejected,
    WrongChain,
)
from .signing import verify_tx_signature
from .state import LedgerState, vote_key
from .types import MAX_NONCE, BreakerVote, Settle, Stake, Transfer, Tx, Unstake

DEFAULT_MAX_TXS = 10_000
DEFAULT_MAX_PER_SENDER = 64
# Pending txs are checked with this account as their block's proposer: a real proposer is
# not known yet, and fees only move to the proposer after the sender has paid them.
CHECK_PROPOSER = bytes(32)


class CommitRate:
    """How many txs this node saw committed per second lately, and so how long a backlog the
    network can take on: ``limit()`` is about ``backlog_seconds`` of commits, never under
    ``floor`` (an idle network must still fill its next blocks) nor over
    ``ceiling`` (the mempool's size). Pure: the caller passes its clock.

    Admission under load keeps the mempool within this limit, so that the work a node takes
    on (signature checks, forwarding, timing requests) follows what consensus commits. Without
    it, a network offered more than it commits (or one whose CPUs something else takes) fills
    every mempool to the brim, its rounds slow down behind admission work until request
    timers fire, and view changes take the place of commits."""

    def __init__(self, *, floor: int, ceiling: int, backlog_seconds: float = 5.0, window: float = 10.0) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.backlog_seconds = backlog_seconds
        self.window = window
        self._blocks: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def committed(self, now: float, txs: int) -> None:
        """A block of ``txs`` txs was committed at ``now``."""
        self._blocks.append((now, txs))
        self._total += txs
        self._expire(now)

    def rate(self, now: float) -> float:
        """Txs committed per second over the window (or since the first block in it, at
        least one second ago: a burst of blocks just after idling is not a rate)."""
        self._expire(now)
        if not self._blocks:
            return 0.0
        span = max(1.0, now - self._blocks[0][0])
        return self._total / span

    def limit(self, now: float) -> int:
        return int(min(self.ceiling, max(self.floor, self.rate(now) * self.backlog_seconds)))

    def _expire(self, now: float) -> None:
        while self._blocks and self._blocks[0][0] < now - self.window:
            self._total -= self._blocks.popleft()[1]


@dataclass(frozen=True)
class Pending:
    tx: Tx
    hash: bytes
    encoded: bytes
    received: float  # the caller's clock, for re-forwarding old txs


class Mempool:
    def __init__(
        self, state: LedgerState, *, max_txs: int = DEFAULT_MAX_TXS, max_per_sender: int = DEFAULT_MAX_PER_SENDER
    ) -> None:
        self._state = state
        self.max_txs = max_txs
        self.max_per_sender = max_per_sender
        self._txs: dict[bytes, Pending] = {}  # by hash, in arrival order
        self._by_sender: dict[bytes, dict[int, bytes]] = {}  # sender -> nonce -> hash, ascending
        self._votes: dict[bytes, dict[bytes, int]] = {}  # model || voter -> pending tx hash -> epoch
        # sender -> [balance its pending txs spend (fees, transfer and stake amounts), their
        # stake change, how many are settlements]: admission costs O(1), not O(queue)
        self._queued: dict[bytes, list[int]] = {}
        self.admitted = 0
        self.rejected = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._txs)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._txs

    def get(self, digest: bytes) -> Pending | None:
        return self._txs.get(digest)

    def pending(self) -> Iterable[Pending]:
        """Every pending tx in arrival order."""
        return list(self._txs.values())

    def next_nonce(self, sender: bytes) -> int:
        """The nonce ``sender``'s next tx must carry: its account nonce plus its pending txs."""
        return self._state.account(sender).nonce + len(self._by_sender.get(sender, {}))

    def statistics(self) -> dict[str, int]:
        return {
            "size": len(self._txs),
            "senders": len(self._by_sender),
            "admitted": self.admitted,
            "rejected": self.rejected,
            "evicted": self.evicted,
        }

    # ------------------------------------------------------------ admission

    def add(self, tx: Tx, *, now: float = 0.0, verified: bool = False) -> Pending:
        """Admit ``tx`` or raise a TxRejected subclass saying why (nothing changes then).

        ``verified=True``: the caller has checked the sender's signature already (in a worker
        thread, say); every other rule is still checked here."""
        try:
            return self._add(tx, now, verified)
        except TxRejected:
            self.rejected += 1
            raise

    def precheck(self, txs: Sequence[Tx], *, limit: int | None = None) -> list[TxRejected | None]:
        """For a submission of ``txs`` (in order), the refusal ``add`` would give each tx
        whatever its signature, or None: not pending already nor earlier in the submission,
        this chain, a nonce the sender can use next, room in its queue, and room in the
        mempool for a tx at the minimum fee. A caller runs this before paying for signature
        checks, so that a flood of txs that cannot get in costs little to turn away; ``add``
        still checks everything. Earlier txs of the submission may yet fail, so a nonce counts
        as usable up to the sender's next one plus the nonces its earlier txs claimed.

        ``limit`` (at most ``max_txs``): the backlog the network can take on now
        (``CommitRate.limit``); past it, as past a full mempool, only a fee above the minimum
        gets in (``add`` then admits it up to ``max_txs``, evicting as ever)."""
        out: list[TxRejected | None] = []
        ahead: dict[bytes, int] = {}  # sender -> nonces after its next one claimed so far
        seen: set[bytes] = set()
        floor = self._state.params.min_fee
        room = self.max_txs if limit is None else min(limit, self.max_txs)
        passed = 0
        for tx in txs:
            digest = tx_hash(tx)
            claimed = ahead.get(tx.sender, 0)
            try:
                if digest in seen:
                    raise DuplicateTx(f"tx {digest.hex()} is already pending")
                self._check_slot(tx, digest, claimed)
                if len(self._txs) + passed >= room and tx.fee <= floor:
                    raise MempoolFull(self._full_message(room, floor))
            except TxRejected as exc:
                out.append(exc)
                continue
            out.append(None)
            seen.add(digest)
            passed += 1
            if tx.nonce == self.next_nonce(tx.sender) + claimed:
                ahead[tx.sender] = claimed + 1
        return out

    def _full_message(self, room: int, floor: int) -> str:
        if room < self.max_txs:
            return (
                f"the network is busy: {len(self._txs)} txs wait, as many as it commits in a few seconds;"
                f" only a fee above {floor} can get in now (or try again later)"
            )
        return f"the mempool holds {len(self._txs)} txs; only a fee above {floor} can get in now"

    def _check_slot(self, tx: Tx, digest: bytes, ahead: int = 0) -> None:
        if digest in self._txs:
            raise DuplicateTx(f"tx {digest.hex()} is already pending")
        if tx.chain_id != self._state.chain_id:
            raise WrongChain(f"tx for chain {tx.chain_id!r}, this ledger is {self._state.chain_id!r}")
        queue = self._by_sender.get(tx.sender, {})
        base = self._state.account(tx.sender).nonce
        if base <= tx.nonce < base + len(queue):
            other = queue[tx.nonce].hex()
            raise DuplicateTx(f"account {tx.sender.hex()} already has pending tx {other} with nonce {tx.nonce}")
        if not base + len(queue) <= tx.nonce <= base + len(queue) + ahead:
            raise BadNonce(tx.sender, base + len(queue) + ahead, tx.nonce)
        if tx.nonce - base >= self.max_per_sender:
            raise TooManyPending(f"account {tx.sender.hex()} already has {len(queue)} pending txs (the limit)")

    def _add(self, tx: Tx, now: float, verified: bool) -> Pending:
        encoded = encode_tx(tx)  # validates every field first
        digest = tx_hash(tx)
        self._check_slot(tx, digest)
        queue = self._by_sender.get(tx.sender, {})
        queued = self._queued.get(tx.sender)
        if isinstance(tx.body, Settle) or (queued is not None and queued[2]):
            ahead = [self._txs[h].tx for h in queue.values()]
            self._check_after_queue(tx, ahead, verify=not verified)  # receipts move others' funds: full rules
            if type(tx.body) is BreakerVote:
                self._check_vote_pending(tx.body)
        elif type(tx.body) is BreakerVote:
            self._check_vote(tx, tx.body, queued, verified)
        else:
            self._check_simple(tx, queued)
            if not verified and not verify_tx_signature(tx):
                raise BadSignature(f"tx from {tx.sender.hex()} nonce {tx.nonce}: signature does not verify")
        victim = None
        if len(self._txs) >= self.max_txs:
            # a tx at the minimum fee cannot beat anyone's: refuse it without the O(senders) scan
            victim = self._eviction_candidate(exclude=tx.sender) if tx.fee > self._state.params.min_fee else None
            if victim is None or victim.tx.fee >= tx.fee:
                floor = victim.tx.fee if victim else 0
                raise MempoolFull(f"the mempool holds {len(self._txs)} txs; only a fee above {floor} gets in now")
        if victim is not None:
            self._remove(victim.hash)
            self.evicted += 1
        entry = Pending(tx, digest, encoded, now)
        self._txs[digest] = entry
        self._by_sender.setdefault(tx.sender, {})[tx.nonce] = digest
        if type(tx.body) is BreakerVote:
            v = tx.body.vote
            self._votes.setdefault(vote_key(v.model, v.voter), {})[digest] = v.epoch
        self._count(tx, 1)
        self.admitted += 1
        return entry

    def _check_vote_pending(self, body: BreakerVote) -> None:
        v = body.vote
        pending = self._votes.get(vote_key(v.model, v.voter))
        if pending and max(pending.values()) >= v.epoch:
            raise DuplicateTx(
                f"a tx recording the vote of {v.voter.hex()} on model {v.model.hex()} with epoch "
                f"{max(pending.values())} is pending"
            )

    def _check_vote(self, tx: Tx, body: BreakerVote, queued: list[int] | None, verified: bool) -> None:
        """A BreakerVote against the committed state (the voter's stake, the recorded epoch)
        and the pending votes; the sender's balance after its pending txs covers the fee."""
        who = f"tx from {tx.sender.hex()} nonce {tx.nonce}"
        if tx.nonce == MAX_NONCE:
            raise MalformedTx(f"{who}: account nonce space exhausted")
        if tx.fee < self._state.params.min_fee:
            raise FeeTooLow(f"{who}: fee {tx.fee} is below the minimum fee {self._state.params.min_fee}")
        self._state.check_vote_body(body, who)
        self._check_vote_pending(body)
        balance = self._state.account(tx.sender).balance - (queued[0] if queued is not None else 0)
        if balance < tx.fee:
            raise InsufficientFunds(f"{who}: balance {balance} (after its pending txs) does not cover fee {tx.fee}")
        if not verified and not (verify_tx_signature(tx) and verify_vote(body.vote)):
            raise BadSignature(f"{who}: a signature does not verify")

    def _count(self, tx: Tx, sign: int) -> None:
        """Add (sign 1) or take away (-1) ``tx``'s share of its sender's queued totals."""
        spent, stake, settles = tx.fee, 0, 0
        body = tx.body
        if isinstance(body, Transfer | Stake):
            spent += body.amount
        if isinstance(body, Stake):
            stake = body.amount
        elif isinstance(body, Unstake):
            stake = -body.amount
        elif isinstance(body, Settle):
            settles = 1
        totals = self._queued.setdefault(tx.sender, [0, 0, 0])
        totals[0] += sign * spent
        totals[1] += sign * stake
        totals[2] += sign * settles

    def _check_simple(self, tx: Tx, queued: list[int] | None) -> None:
        """The rules of a transfer, stake or unstake against the committed account less what
        the sender's pending txs spend, at a fraction of the cost of ``state.check`` after the
        queue. What pending txs would credit the sender (a transfer to itself) is not counted,
        so this may refuse a tx that would apply; it never admits one that would not."""
        account = self._state.account(tx.sender)
        who = f"tx from {tx.sender.hex()} nonce {tx.nonce}"
        if tx.nonce == MAX_NONCE:
            raise MalformedTx(f"{who}: account nonce space exhausted")
        if tx.fee < self._state.params.min_fee:
            raise FeeTooLow(f"{who}: fee {tx.fee} is below the minimum fee {self._state.params.min_fee}")
        body = tx.body
        assert isinstance(body, Transfer | Stake | Unstake)
        if body.amount <= 0:
            raise AmountOutOfRange(f"{who}: {type(body).__name__.lower()} amount must be positive, got 0")
        balance, stake = account.balance, account.stake
        if queued is not None:
            balance -= queued[0]
            stake += queued[1]
        pending = " (after its pending txs)" if tx.sender in self._by_sender else ""
        if isinstance(body, Unstake):
            if stake < body.amount:
                raise InsufficientStake(f"{who}: stake {stake}{pending} does not cover unstake {body.amount}")
            if balance < tx.fee:
                raise InsufficientFunds(f"{who}: balance {balance}{pending} does not cover fee {tx.fee}")
        elif balance < body.amount + tx.fee:
            raise InsufficientFunds(
                f"{who}: balance {balance}{pending} does not cover amount {body.amount} + fee {tx.fee}"
            )

    def _check_after_queue(self, tx: Tx, ahead: list[Tx], *, verify: bool) -> None:
        """``state.check(tx)`` as if the sender's pending txs had been applied first."""
        state = self._state
        height = state.height + 1
        if not ahead:
            state.check(tx, proposer=CHECK_PROPOSER, height=height, verify=verify)
            return
        try:
            for earlier in ahead:
                state.apply(earlier, proposer=CHECK_PROPOSER, height=height, verify=False)
            state.check(tx, proposer=CHECK_PROPOSER, height=height, verify=verify)
        finally:
            state.revert_to_checkpoint()

    def _eviction_candidate(self, *, exclude: bytes) -> Pending | None:
        """The cheapest tx that ends another sender's queue (the newcomer's own last tx would
        leave a gap right before it)."""
        tails = [self._txs[q[max(q)]] for s, q in self._by_sender.items() if q and s != exclude]
        return min(tails, key=lambda p: (p.tx.fee, -p.received), default=None)

    def _remove(self, digest: bytes) -> None:
        entry = self._txs.pop(digest)
        queue = self._by_sender[entry.tx.sender]
        del queue[entry.tx.nonce]
        self._count(entry.tx, -1)
        if not queue:
            del self._by_sender[entry.tx.sender]
            del self._queued[entry.tx.sender]
        if type(entry.tx.body) is BreakerVote:
            v = entry.tx.body.vote
            key = vote_key(v.model, v.voter)
            pending = self._votes[key]
            del pending[digest]
            if not pending:
                del self._votes[key]

    def _stale_votes(self) -> list[bytes]:
        """Pending BreakerVotes whose vote the ledger has recorded or superseded since."""
        out = []
        for pending in self._votes.values():
            for digest in pending:
                v = self._txs[digest].tx.body.vote  # type: ignore[union-attr]
                record = self._state.vote_record(v.model, v.voter)
                if record is not None and record.vote.epoch >= v.epoch:
                    out.append(digest)
        return out

    # ------------------------------------------------------------ blocks

    def select(self, limit: int) -> list[Tx]:
        """Up to ``limit`` txs for the next block, first come first served."""
        return [entry.tx for entry in self.select_pending(limit)]

    def select_pending(self, limit: int) -> list[Pending]:
        """The entries of ``select``."""
        return list(itertools.islice(self._txs.values(), limit))

    def reconcile(self, senders: Iterable[bytes] | None = None) -> int:
        """After the state moved on (a block): drop every pending tx of ``senders`` (all when
        None) that no longer fits: nonces now used, and any tx behind a gap; and every pending
        BreakerVote the ledger has recorded or superseded meanwhile (with its sender's later
        txs). Returns the number dropped."""
        dropped = 0
        if self._votes:
            stale = self._stale_votes()
            if stale:
                senders = None if senders is None else {*senders, *(self._txs[d].tx.sender for d in stale)}
                for digest in stale:
                    self._remove(digest)
                dropped += len(stale)
        for sender in list(self._by_sender if senders is None else senders):
            queue = self._by_sender.get(sender)
            if not queue:
                continue
            expected = self._state.account(sender).nonce
            for nonce in sorted(queue):
                if nonce == expected:
                    expected += 1
                else:
                    self._remove(queue[nonce])
                    dropped += 1
        return dropped

    def discard(self, digests: Iterable[bytes]) -> None:
        """Drop these txs (rejected by a block, for instance); their successors go on reconcile."""
        for digest in digests:
            if digest in self._txs:
                self._remove(digest)

"""The chain service: this node's ledger, its mempool, and how blocks reach it.

Roles, from genesis:
- **solo validator** (the one validator of a development genesis): makes blocks from its
  mempool, signs them, commits them.
- **PBFT validator** (one of several genesis validators): the consensus service
  (prsm_node/consensus/service.py) orders batches with PBFT; this service builds proposals
  (``propose_txs``) and turns each committed batch into a block (``commit_batch``), stored with
  its PBFT commit certificate. It also follows the chain like a follower, to catch up.
- **follower** (every other node): admits txs to its own mempool, forwards them to the
  validators over ``/prsm/tx/1.0.0``, and keeps its ledger in step by fetching blocks with
  their commit certificates over ``/prsm/sync/1.0.0``, checking the validator signatures and
  replaying every tx itself.

Every change of the state happens on the event loop between two blocks; the LevelDB write of
a block runs in a worker thread under ``_lock``, during which no tx is admitted (admission
uses the state's undo journal, which a block in flight must keep).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .._trio import TaskStatus
from ..config import LedgerSection
from ..consensus.blocks import BadBatch, execute_batch, rebuild_batch
from ..consensus.certs import ValidatorSet
from ..consensus.exceptions import ConfigurationError, InvalidMessage
from ..consensus.messages import CommitCertificate, batch_digest
from ..genesis import Genesis
from ..keys import NodeKey
from ..ledger.block import (
    Block,
    BlockRejected,
    Certificate,
    PbftProof,
    apply_block,
    decode_block,
    decode_certificate,
    make_block,
    sign_commit,
    verify_certificate,
)
from ..ledger.codec import encode_tx, tx_hash
from ..ledger.exceptions import (
    BadSignature,
    DuplicateTx,
    LedgerDecodeError,
    MalformedTx,
    SupplyViolation,
    TxRejected,
)
from ..ledger.mempool import CommitRate, Mempool, Pending
from ..ledger.signing import sign_tx
from ..ledger.state import LedgerState
from ..ledger.storage import LedgerStore, Tip, touched_accounts
from ..ledger.types import Body, Tx, VoteRecord
from ..logs import kv
from ..store import Store
from .verifier import SignatureVerifier

log = logging.getLogger(__name__)

# Txs whose signatures this node checked outside admission (in a PRE-PREPARE's batch) that it
# remembers by hash, so that another copy (forwarded late) is not checked again: a batch or
# two of them, far more than wait between a PRE-PREPARE and the block it becomes.
VERIFIED_KEPT = 16384


class _Verdict:
    """The signature check of one block, filled in by the verifier."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.bad: int | None = None


@dataclass(frozen=True)
class Committed:
    height: int
    index: int
    block_hash: bytes


class ChainService:
    def __init__(self, store: Store, genesis: Genesis, key: NodeKey, cfg: LedgerSection) -> None:
        self.cfg = cfg
        self.genesis = genesis
        self.key = key
        self.account = key.account
        self.ledger = LedgerStore(store.namespace("ledger"), genesis)
        self.validators = frozenset(bytes.fromhex(v.account) for v in genesis.validators)
        self.validator_peers = {bytes.fromhex(v.account): v.peer_id for v in genesis.validators}
        n = len(self.validators)
        self.quorum = n - (n - 1) // 3  # 2f+1 for n = 3f+1 (and n - f in general)
        self.is_validator = self.account in self.validators
        self.solo = self.is_validator and n == 1
        self.validator_order = tuple(bytes.fromhex(v.account) for v in genesis.validators)
        try:
            self.validator_set: ValidatorSet | None = ValidatorSet(genesis.chain_id, self.validator_order)
        except ConfigurationError:
            self.validator_set = None  # 2 or 3 validators: PBFT needs at least 4
        self.consensus_running = False
        # Set by the consensus service: called with the txs this node admits to its mempool.
        self.on_admitted: Callable[[list[Pending]], None] | None = None
        self._state: LedgerState | None = None
        self._mempool: Mempool | None = None
        self.tip = Tip(0, bytes(32), 0)
        self._lock = trio.Lock()
        self._admission = trio.Lock()  # submit_many: one submission at a time
        self._new_block = trio.Event()
        self._new_tx = trio.Event()
        self.verifier = SignatureVerifier()
        self._verified: dict[bytes, Tx] = {}  # tx hash -> tx, oldest first (VERIFIED_KEPT)
        self.backlog_shares: Callable[[], int] = lambda: 1  # set by ChainNet
        self.blocks_made = 0
        # (txs, ms) of recent blocks this node made: select, apply, state hash, synced write.
        self.block_timings: collections.deque[tuple[int, float]] = collections.deque(maxlen=1024)
        self.blocks_synced = 0
        # The backlog admission takes on: a few seconds of what the network commits (at least two blocks).
        self.commit_rate = CommitRate(floor=2 * cfg.max_block_txs, ceiling=cfg.mempool_size)

    # ------------------------------------------------------------ accessors

    @property
    def state(self) -> LedgerState:
        assert self._state is not None, "the chain service is not running"
        return self._state

    @property
    def mempool(self) -> Mempool:
        assert self._mempool is not None, "the chain service is not running"
        return self._mempool

    @property
    def role(self) -> str:
        if self.solo or self.consensus_running:
            return "validator"
        return "validator (waiting for consensus)" if self.is_validator else "follower"

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        state, self.tip = await trio.to_thread.run_sync(self.ledger.load)
        self._state = state
        self._mempool = Mempool(state, max_txs=self.cfg.mempool_size, max_per_sender=self.cfg.mempool_per_sender)
        log.info(
            "ledger loaded",
            extra=kv(height=self.tip.height, state_hash=state.state_hash().hex()[:16], role=self.role),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.verifier.run)
            if self.solo:
                nursery.start_soon(self._produce_loop)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------ transactions

    async def submit(
        self, tx: Tx | None = None, *, body: Body | None = None, fee: int = 0, from_validator: bool = False
    ) -> Pending:
        """Admit a signed tx to the mempool (raises a TxRejected subclass saying why).

        With ``body`` instead, this node signs the tx with its own key and next nonce; both
        happen under the lock, so concurrent requests never pick the same nonce. A tx from a
        client or a follower is held to the backlog limit (``CommitRate``); one another
        validator forwards is not (it times that request: refusing it would look like a
        primary that ignores requests), nor one this node signs."""
        if tx is not None:
            encode_tx(tx)  # a malformed tx fails here, before it costs a signature check
            if not from_validator:
                async with self._lock:
                    refused = self.mempool.precheck([tx], limit=self.backlog_limit())[0]
                if refused is not None:
                    self.mempool.rejected += 1
                    raise refused
            if tx_hash(tx) not in self._verified and not await self.verifier.verify(tx):
                raise BadSignature(f"tx from {tx.sender.hex()} nonce {tx.nonce}: a signature does not verify")
        async with self._lock:
            if tx is None:
                assert body is not None
                nonce = self.mempool.next_nonce(self.account)
                tx = sign_tx(self.key.signing_key, chain_id=self.state.chain_id, nonce=nonce, fee=fee, body=body)
            entry = self.mempool.add(tx, now=time.monotonic(), verified=True)
        self._admitted([entry])
        return entry

    @asynccontextmanager
    async def committed_state(self) -> AsyncIterator[LedgerState]:
        """The state at the committed tip, for readers that report it. A block is applied to
        ``state`` before its synced write, and the tip moves after (or the state is rolled
        back if the write fails): between the two, ``state`` shows what may never commit.
        Every block is applied and written under ``_lock``, so holding it sees no such block."""
        async with self._lock:
            yield self.state

    def backlog_limit(self) -> int:
        """How many pending txs admission lets in now at the minimum fee (``CommitRate``),
        divided by ``backlog_shares()``: a validator that sends its clients' txs to the
        primary alone (``ChainNet``) holds its share of the network's backlog, not all of it,
        while the primary holds everyone's."""
        return max(1, self.commit_rate.limit(time.monotonic()) // self.backlog_shares())

    async def submit_many(self, txs: Sequence[Tx], *, from_validator: bool = False) -> list[Pending | TxRejected]:
        """Admit many signed txs, in order: one batched signature check (on the verifier's
        worker process when there are enough) and one turn of the lock for all of them.
        Returns, per tx, its mempool entry or the TxRejected that refused it. A tx the mempool
        would refuse whatever its signature (pending already, a used or skipped nonce, a full
        queue or mempool, a backlog past ``backlog_limit`` unless ``from_validator``:
        ``Mempool.precheck``) is refused before its signature check, so load beyond what
        the network commits costs little to turn away.

        One submission is admitted at a time (others wait their turn, at no cost): under
        overload, admission from many clients and links at once would otherwise take the
        event loop's turns from consensus, whose rounds then slow down until they time out."""
        async with self._admission:
            return await self._submit_many(txs, None if from_validator else self.backlog_limit())

    async def _submit_many(self, txs: Sequence[Tx], limit: int | None) -> list[Pending | TxRejected]:
        out: list[Pending | TxRejected] = [DuplicateTx("unchecked")] * len(txs)
        to_check: list[int] = []
        decoded: list[int] = []
        for i, tx in enumerate(txs):
            try:
                encode_tx(tx)  # a malformed tx fails here
            except TxRejected as exc:
                out[i] = exc
                continue
            except LedgerDecodeError as exc:
                out[i] = MalformedTx(str(exc))
                continue
            decoded.append(i)
        async with self._lock:  # the mempool matches the state only between blocks
            refusals = self.mempool.precheck([txs[i] for i in decoded], limit=limit)
        checked_before: list[int] = []
        for i, refused in zip(decoded, refusals, strict=True):
            if refused is not None:
                out[i] = refused
            elif tx_hash(txs[i]) in self._verified:
                checked_before.append(i)  # its very bytes were verified in a PRE-PREPARE
            else:
                to_check.append(i)
        oks = await self.verifier.verify_many([txs[i] for i in to_check])
        if checked_before:
            to_check += checked_before
            oks += [True] * len(checked_before)
        admitted: list[Pending] = []
        async with self._lock:
            now = time.monotonic()
            for i, ok in zip(to_check, oks, strict=True):
                tx = txs[i]
                if not ok:
                    out[i] = BadSignature(f"tx from {tx.sender.hex()} nonce {tx.nonce}: a signature does not verify")
                    continue
                try:
                    entry = self.mempool.add(tx, now=now, verified=True)
                except TxRejected as exc:
                    out[i] = exc
                    continue
                out[i] = entry
                admitted.append(entry)
        if admitted:
            self._admitted(admitted)
        return out

    def _admitted(self, entries: list[Pending]) -> None:
        if self.on_admitted is not None:
            self.on_admitted(entries)
        self._new_tx.set()
        self._new_tx = trio.Event()

    def known_tx(self, digest: bytes) -> Tx | None:
        """The decoded tx of this hash if the mempool holds it (admitted: canonical, checked)
        or its signatures were checked in a batch (``remember_verified``)."""
        entry = self.mempool.get(digest)
        return entry.tx if entry is not None else self._verified.get(digest)

    def remember_verified(self, checked: Iterable[tuple[bytes, Tx]]) -> None:
        """Remember txs (by the hash of their signed encoding) whose signatures this node
        checked outside admission, the most recent VERIFIED_KEPT of them: a copy that comes
        later (forwarded by another validator after the PRE-PREPARE that carried it) is
        admitted without a second check, and a block holding it skips the check too."""
        for digest, tx in checked:
            self._verified[digest] = tx
        excess = len(self._verified) - VERIFIED_KEPT
        if excess > 0:
            for digest in list(itertools.islice(self._verified, excess)):
                del self._verified[digest]

    def locate(self, digest: bytes) -> Committed | None:
        where = self.ledger.locate(digest)
        if where is None:
            return None
        block = self.ledger.block(where.height)
        return Committed(where.height, where.index, block.hash())

    async def wait_committed(self, digest: bytes) -> Committed:
        """Wait until the tx with this hash is in a committed block (cancel to give up)."""
        while True:
            event = self._new_block
            found = self.locate(digest)
            if found is not None:
                return found
            await event.wait()

    async def wait_height(self, height: int) -> None:
        while self.tip.height < height:
            await self._new_block.wait()

    async def wait_new_tx(self) -> None:
        await self._new_tx.wait()

    # ------------------------------------------------------------ blocks

    async def _produce_loop(self) -> None:
        """Make a block whenever txs wait (or stake is unbonding), at most one per interval."""
        last = -float("inf")
        while True:
            while not len(self.mempool) and not self.state.unbonding_pending:
                await self._new_tx.wait()
            await trio.sleep_until(last + self.cfg.block_interval)
            last = trio.current_time()
            await self.produce_block()

    async def produce_block(self) -> Block:
        """Make, sign and commit one block from the mempool (solo validator)."""
        async with self._lock:
            started = time.perf_counter()
            state = self.state
            txs = self.mempool.select(self.cfg.max_block_txs)
            time_ms = max(int(time.time() * 1000), self.tip.time_ms)
            try:
                block, included, dropped = make_block(
                    state, txs, proposer=self.account, prev_hash=self.tip.hash, time_ms=time_ms
                )
            except BaseException:
                state.revert_to_checkpoint()
                raise
            cert = Certificate((sign_commit(self.key.signing_key, block),))
            await self._commit(block, cert, included)
            self.mempool.discard(tx_hash(tx) for tx, _ in dropped)
            for tx, why in dropped:
                log.info("tx dropped from block", extra=kv(tx=tx_hash(tx).hex()[:16], error=str(why)))
            self._after_block(included, [tx for tx, _ in dropped])
            self.block_timings.append((len(included), (time.perf_counter() - started) * 1000))
        self.blocks_made += 1
        return block

    async def apply_synced(self, items: list[tuple[bytes, bytes]]) -> int:
        """Check blocks fetched from a peer and apply them in order: each needs 2f+1 validator
        signatures, and every tx is replayed here. Each block's tx signatures are queued for
        the verifier as soon as it is decoded, so the verifier works through later blocks
        while earlier ones are applied and written. Returns the blocks applied; raises
        BlockRejected or LedgerDecodeError at the first bad one (earlier ones stay)."""
        checked: list[tuple[Block, list[Tx], Certificate, _Verdict]] = []
        error: Exception | None = None
        applied = 0
        async with trio.open_nursery() as nursery:
            for block_bytes, cert_bytes in items:
                try:
                    block, txs = decode_block(block_bytes)
                    cert = decode_certificate(cert_bytes)
                    if block.header.proposer not in self.validators:
                        raise BlockRejected(f"block {block.height} was proposed by a non-validator")
                    if cert.pbft is None:
                        verify_certificate(cert, block, self.validators, self.quorum)
                    else:
                        self._check_pbft_certificate(block, cert)
                except (BlockRejected, LedgerDecodeError) as exc:
                    error = exc
                    break
                if block.height <= self.tip.height:  # consensus got there first: no checks
                    continue
                verdict = _Verdict()
                nursery.start_soon(self._check_signatures, txs, verdict)
                checked.append((block, txs, cert, verdict))
                await trio.lowlevel.checkpoint()  # let it queue at the verifier, in order
            for block, txs, cert, verdict in checked:
                await verdict.done.wait()
                try:
                    if verdict.bad is not None:
                        raise BlockRejected(f"block {block.height} tx {verdict.bad}: a signature does not verify")
                    await self._apply_checked(block, txs, cert)
                except (BlockRejected, LedgerDecodeError) as exc:
                    error = exc
                    break
                applied += 1
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return applied

    async def _check_signatures(self, txs: list[Tx], verdict: _Verdict) -> None:
        """Checks the txs not checked here before (admitted to the mempool, or in a batch:
        ``known_tx``): a validator that polls finds blocks its consensus is about to commit."""
        todo = [i for i, tx in enumerate(txs) if self.known_tx(tx_hash(tx)) is None]
        bad = await self.verifier.first_invalid([txs[i] for i in todo]) if todo else None
        verdict.bad = None if bad is None else todo[bad]
        verdict.done.set()

    def _check_pbft_certificate(self, block: Block, cert: Certificate) -> None:
        """The PBFT kind: a quorum of the validators' COMMIT signatures over ``(view, seq,
        digest)``, ``seq`` the block's height and ``digest`` that of the batch rebuilt from
        the block (``_apply_checked`` then re-executes that batch into this very block)."""
        p = cert.pbft
        assert p is not None
        if self.validator_set is None:
            raise BlockRejected("a PBFT certificate on a chain with fewer than 4 validators")
        if p.seq != block.height:
            raise BlockRejected(f"block {block.height} comes with the certificate of seq {p.seq}")
        try:
            batch = rebuild_batch(block, p.meta, p.skipped)
        except BadBatch as exc:
            raise BlockRejected(f"block {block.height}: {exc}") from None
        if batch_digest(self.genesis.chain_id, batch) != p.digest:
            raise BlockRejected(f"block {block.height} is not the batch its certificate commits")
        try:
            self.validator_set.check_commit_cert(CommitCertificate(p.view, p.seq, p.digest, cert.signatures))
        except InvalidMessage as exc:
            raise BlockRejected(f"block {block.height}: {exc}") from None

    async def _apply_checked(self, block: Block, txs: list[Tx], cert: Certificate) -> None:
        async with self._lock:
            if block.height <= self.tip.height:  # consensus or another sync got there first
                return
            if block.height != self.tip.height + 1:
                raise BlockRejected(f"block {block.height} does not follow height {self.tip.height}")
            if cert.pbft is None:
                apply_block(
                    self.state, block, txs, prev_hash=self.tip.hash, prev_time_ms=self.tip.time_ms, verify=False
                )
            else:
                self._execute_certified(block, cert.pbft)
            await self._commit(block, cert, txs)
            self.mempool.discard(tx_hash(tx) for tx in txs)
            self._after_block(txs, [])
        self.blocks_synced += 1

    def _execute_certified(self, block: Block, p: PbftProof) -> None:
        """Re-execute a certified batch; it must give exactly ``block`` (else the state is
        reverted and the block rejected)."""
        batch = rebuild_batch(block, p.meta, p.skipped)
        try:
            done = execute_batch(
                self.state,
                batch,
                prev_hash=self.tip.hash,
                prev_time_ms=self.tip.time_ms,
                null_proposer=self.validator_order[0],
            )
        except BaseException:
            self.state.revert_to_checkpoint()
            raise
        if done.block != block or done.skipped != p.skipped:
            self.state.revert_to_checkpoint()
            raise BlockRejected(f"block {block.height} is not what its certified batch executes to")

    # ------------------------------------------------------------ PBFT hooks

    async def propose_txs(self, max_txs: int, max_bytes: int) -> list[bytes]:
        """Encoded txs for the primary's next batch: the mempool's first, in its order. No
        trial block is made: what the mempool holds applies, in order, as one block (its
        admission rules guarantee it, and a hypothesis test checks it), and a tx that did not
        would be skipped, the same way on every replica, when the batch commits."""
        async with self._lock:
            out: list[bytes] = []
            size = 0
            for entry in self.mempool.select_pending(min(max_txs, self.cfg.max_block_txs)):
                if size + len(entry.encoded) > max_bytes:
                    break
                out.append(entry.encoded)
                size += len(entry.encoded)
            return out

    async def commit_batch(self, seq: int, batch: Sequence[bytes], cert: CommitCertificate) -> bytes:
        """Turn the batch PBFT committed at ``seq`` into block ``seq`` and store it with its
        certificate; returns the block hash (the replica's checkpoint digest). A block that
        is already here (synced from a peer) is not made again."""
        async with self._lock:
            if seq <= self.tip.height:
                return self.ledger.block(seq).hash()
            if seq != self.tip.height + 1:
                raise BlockRejected(f"batch {seq} committed, the ledger is at height {self.tip.height}")
            started = time.perf_counter()
            try:
                done = execute_batch(
                    self.state,
                    batch,
                    prev_hash=self.tip.hash,
                    prev_time_ms=self.tip.time_ms,
                    null_proposer=self.validator_order[0],
                    known=self.known_tx,
                )
            except BaseException:
                self.state.revert_to_checkpoint()
                raise
            meta = batch[0] if batch else b""
            proof = PbftProof(cert.view, cert.seq, cert.digest, meta, done.skipped)
            await self._commit(done.block, Certificate(tuple(cert.commits), proof), done.included)
            self.mempool.discard([tx_hash(tx) for tx in done.included] + [tx_hash(tx) for tx in done.dropped])
            self._after_block(done.included, done.dropped)
            self.block_timings.append((len(done.included), (time.perf_counter() - started) * 1000))
        self.blocks_made += 1
        return done.block.hash()

    async def _commit(self, block: Block, cert: Certificate, txs: list[Tx]) -> None:
        """Persist the block and the state changes (synced), then make them final in memory.
        On any failure the in-memory state is rolled back to the last committed block."""
        state = self.state
        try:
            state.check_block_supply()
            changes = state.changes()
            await trio.to_thread.run_sync(self.ledger.commit, block, cert, txs, changes)
        except BaseException:
            state.revert_to_checkpoint()
            raise
        state.checkpoint()
        self.tip = Tip(block.height, block.hash(), block.header.time_ms)
        log.info(
            "block committed",
            extra=kv(height=block.height, txs=len(txs), hash=block.hash().hex()[:16]),
        )

    def _after_block(self, included: list[Tx], dropped: list[Tx]) -> None:
        senders = {tx.sender for tx in included} | {tx.sender for tx in dropped}
        for tx in included:
            senders.update(touched_accounts(tx))
        self.mempool.reconcile(senders)
        self.commit_rate.committed(time.monotonic(), len(included))
        self._new_block.set()
        self._new_block = trio.Event()

    def committed_vote_records(self, model: bytes | None = None) -> Iterator[VoteRecord]:
        """The breaker votes recorded by committed blocks (of ``model``, or all). A block is
        applied to ``state`` before it is written (synced, in a thread); what it records is
        not shown here until it is durable (and in ``ledger.vote_history``)."""
        tip = self.tip.height
        return (r for r in self.state.vote_records(model) if r.height <= tip)

    def committed_vote_record(self, model: bytes, voter: bytes) -> VoteRecord | None:
        record = self.state.vote_record(model, voter)
        return record if record is not None and record.height <= self.tip.height else None

    def block_and_cert(self, height: int) -> tuple[bytes, bytes] | None:
        block = self.ledger.block_bytes(height)
        cert = self.ledger.certificate_bytes(height)
        if block is None or cert is None:
            return None
        return block, cert

    def statistics(self) -> dict[str, object]:
        return {
            "role": self.role,
            "height": self.tip.height,
            "blocks_made": self.blocks_made,
            "blocks_synced": self.blocks_synced,
            "signatures_verified": self.verifier.verified,
            **{f"mempool_{k}": v for k, v in self.mempool.statistics().items()},
        }


__all__ = ["ChainService", "Committed", "LedgerDecodeError", "SupplyViolation"]

"""The consensus service: the PBFT replica of this validator, driven over real streams.

Runs only when the genesis names several validators (at least 4) and this node is one of
them; otherwise it only answers ``consensus.status``. One task (``_drive``) owns the replica
and handles, one at a time: frames from other validators (``PbftNet``), txs this node admits
(``ChainService.on_admitted``), the replica's timer (``next_wakeup``), and finished state
transfers. Every Step is handled as replica.py says: its records are persisted (one synced
LevelDB batch) before its messages leave; committed batches become blocks through
``ChainService.commit_batch``, and the block hash is reported back as the checkpoint digest.

The primary proposes a batch (``blocks.encode_meta`` + txs of a block made from the mempool)
whenever txs wait, at most one batch in flight, and one per ``[ledger].block_interval`` unless
``EAGER_BATCH`` txs wait (then at once).
A lagging replica's state transfer is the chain's own sync loop (``/prsm/sync/1.0.0``, which
validators run too): it waits until the ledger holds the certified checkpoint's block.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost

from .._trio import TaskStatus
from ..chain.service import ChainService
from ..control.server import ControlServer
from ..kad.service import Kademlia
from ..keys import NodeKey
from ..ledger.codec import decode_tx
from ..ledger.exceptions import LedgerDecodeError, TxRejected
from ..ledger.mempool import Pending
from ..ledger.types import Tx
from ..logs import kv
from ..store import Store
from .blocks import BadBatch, check_batch, encode_meta
from .exceptions import HostError, InvalidMessage, ProposalRefused
from .faults import Fault
from .messages import Batch, KeySigner, PrePrepare, decode
from .net import PbftNet
from .outputs import FetchState, Step
from .params import PbftParams
from .records import BatchRecord
from .replica import Replica
from .store import EvidenceStore, RecordStore

log = logging.getLogger(__name__)

INBOX_SIZE = 4096
META_RESERVE = 256  # bytes of a batch's size budget kept for its meta request
EAGER_BATCH = 256  # txs waiting that make the primary propose without waiting for block_interval


class ConsensusService:
    def __init__(
        self,
        host: IHost,
        kad: Kademlia,
        chain: ChainService,
        store: Store,
        key: NodeKey,
        *,
        params: PbftParams | None = None,
        test_fault: str | None = None,
    ) -> None:
        self.host = host
        self.kad = kad
        self.chain = chain
        self.key = key
        self.params = params or PbftParams()
        self.records = RecordStore(store.namespace("pbft"))
        self.evidence_store = EvidenceStore(store.namespace("pbft-evidence"))
        self.enabled = chain.is_validator and len(chain.validators) > 1 and chain.validator_set is not None
        self.test_fault = test_fault
        self.replica: Replica | None = None
        self.net: PbftNet | None = None
        self._fault: Fault | None = None
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[tuple[Any, ...]](INBOX_SIZE)
        self._submitted: set[bytes] = set()
        self._proposed: tuple[int, int] = (-1, 0)  # (view, seq) of this node's last proposal
        self._view_seen: tuple[int, bool] = (0, True)
        self.on_new_view: Callable[[], None] | None = None  # a view became active (ChainNet.forward_pending)
        self._next_propose_at = 0.0
        self._fetch_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.batches_proposed = 0
        self.batches_committed = 0
        self.evidence = 0
        self.inbox_dropped = 0
        self.batch_txs_checked = 0  # txs of accepted batches not in the mempool: checked there

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            if self.chain.is_validator and not self.chain.solo:
                log.error(
                    "PBFT needs at least 4 validators; this genesis names "
                    f"{len(self.chain.validators)}: no blocks will be made"
                )
            task_status.started()
            await trio.sleep_forever()
        vs = self.chain.validator_set
        assert vs is not None
        signer = KeySigner(self.key.signing_key)
        if self.test_fault is not None:
            others = [v for v in vs.validators if v != signer.public_key]
            self._fault = Fault(self.test_fault, signer, vs.chain_id, others)
            for _ in range(3):
                log.warning("TEST FAULT ACTIVE: this validator misbehaves on purpose", extra=kv(fault=self.test_fault))
        stored = await trio.to_thread.run_sync(self.records.load)
        await trio.to_thread.run_sync(self.evidence_store.load)
        now = trio.current_time()
        self.replica, first = Replica.restore(
            vs,
            signer,
            self.params,
            stored,
            executed_seq=self.chain.tip.height,
            validate_batch=self._validate,
            now=now,
        )
        self.net = PbftNet(self.host, self.kad, self.chain.validator_peers, signer.public_key, self._inbox_send)
        log.info(
            "pbft replica started",
            extra=kv(
                view=self.replica.view,
                stable=self.replica.stable_seq,
                height=self.chain.tip.height,
                records=len(stored),
                validators=vs.n,
            ),
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.net.run)
            self.chain.on_admitted = self._on_admitted
            self.chain.consensus_running = True
            try:
                await self._handle(first)
                self._on_admitted(list(self.chain.mempool.pending()))
                task_status.started()
                await self._drive()
            finally:
                self.chain.on_admitted = None
                self.chain.consensus_running = False

    # ------------------------------------------------------------ the driver

    async def _drive(self) -> None:
        r = self._replica
        while True:
            deadline = r.next_wakeup()
            if self._want_proposal():
                deadline = min(deadline, self._propose_at())
            item: tuple[Any, ...] | None = None
            with trio.move_on_at(deadline):
                item = await self._inbox_recv.receive()
            now = trio.current_time()
            if item is not None:
                await self._dispatch(item, now)
            if now >= r.next_wakeup():
                await self._handle(r.tick(now))
            if self._want_proposal() and trio.current_time() >= self._propose_at():
                await self._propose()

    async def _dispatch(self, item: tuple[Any, ...], now: float) -> None:
        r = self._replica
        kind = item[0]
        if kind == "msg":
            _, acct, data = item
            try:
                m = decode(data)
                # Only a PRE-PREPARE signed by its view's primary, for this view or a later one,
                # gets its txs checked ahead: another validator's cannot make us check a batch.
                if isinstance(m, PrePrepare) and len(m.batch) > 1 and m.view >= r.view:
                    if m.sender == r.vs.primary(m.view):
                        r.vs.check(m)
                        await self._preverify(m.batch)
                    now = trio.current_time()
                step = r.receive_message(m, now)
            except InvalidMessage as exc:
                assert self.net is not None
                self.net.penalise(acct, f"{type(exc).__name__}: {exc}")
                return
            await self._handle(step)
        elif kind == "submit":
            # The chain's tx links have sent these to the primary (or, with no active view,
            # to every validator); the replica only times them, and broadcasts them in
            # REQUESTs if they wait too long (protocols/pbft.md rule 18).
            step = Step()
            for data, digest in item[1]:
                try:
                    step.extend(r.submit(data, now, forward=False))
                except HostError as exc:
                    log.debug("request refused by the replica", extra=kv(error=str(exc)))
                    continue
                self._submitted.add(digest)
            await self._handle(step)
        elif kind == "transferred":
            _, seq, digest = item
            await self._handle(r.state_transferred(seq, digest, now))

    def active_primary(self) -> bytes | None:
        """The account of the primary of this validator's view while the view is active: where
        the chain's tx links send the txs this node admits. None while views change, or when
        this node runs no replica."""
        r = self.replica
        if r is None or not r.active:
            return None
        return r.primary

    @property
    def _replica(self) -> Replica:
        assert self.replica is not None, "the consensus service is not running"
        return self.replica

    async def _handle(self, step: Step) -> None:
        """Handle a Step, and the Steps that executing its batches produce, in order."""
        r = self._replica
        if (r.view, r.active) != self._view_seen:
            self._log_view()
        queue = [step]
        while queue:
            s = queue.pop(0)
            if s.records:
                stable = await trio.to_thread.run_sync(self.records.append, s.records)
                if stable:
                    await trio.to_thread.run_sync(self.records.prune)
            self._send(s)
            for c in s.committed:
                digest = await self.chain.commit_batch(c.seq, c.batch, c.certificate)
                self.batches_committed += 1
                queue.append(r.executed(c.seq, digest, trio.current_time()))
            if s.committed:
                self._forget_gone()
            for ev in s.evidence:
                self.evidence += 1
                await trio.to_thread.run_sync(self.evidence_store.add, ev.sender, ev.first, ev.second)
                log.warning("equivocation evidence: a validator signed two conflicting messages",
                            extra=kv(validator=ev.sender.hex()[:16]))
            if s.fetch_state is not None:
                self._start_fetch(s.fetch_state)
            for request in s.requests:
                assert self._nursery is not None
                self._nursery.start_soon(self._admit, request)

    def _log_view(self) -> None:
        r = self._replica
        self._view_seen = (r.view, r.active)
        if r.active:
            log.info("view active", extra=kv(view=r.view, primary=r.primary.hex()[:16], height=self.chain.tip.height))
            if self.on_new_view is not None:
                self.on_new_view()
        else:
            log.warning(
                "view change: requests waited too long, or a quorum moved on",
                extra=kv(to_view=r.view, outstanding=r.statistics().get("outstanding"), height=self.chain.tip.height),
            )

    def _send(self, step: Step) -> None:
        assert self.net is not None
        for out in step.messages:
            for real in self._fault.apply(out) if self._fault is not None else [out]:
                self.net.send(real.to, real.data)

    def _forget_gone(self) -> None:
        """Requests the mempool no longer holds (committed, or dropped as no longer valid)
        must not keep the view-change timer running."""
        mempool = self.chain.mempool
        gone = [d for d in self._submitted if d not in mempool]
        if gone:
            self._replica.forget(gone)
            self._submitted.difference_update(gone)

    # ------------------------------------------------------------ requests and proposals

    def _on_admitted(self, entries: list[Pending]) -> None:
        if not entries:
            return
        try:
            self._inbox_send.send_nowait(("submit", [(e.encoded, e.hash) for e in entries]))
        except trio.WouldBlock:
            self.inbox_dropped += len(entries)

    async def _admit(self, request: bytes) -> None:
        """A request another validator forwarded: into the mempool, and so to the replica."""
        try:
            await self.chain.submit(decode_tx(request), from_validator=True)
        except (TxRejected, LedgerDecodeError) as exc:
            log.debug("forwarded request refused", extra=kv(error=str(exc)))

    async def _preverify(self, batch: Batch) -> None:
        """Check the signatures of a PRE-PREPARE's txs that this node does not hold on the
        verifier's worker process, then remember those that verify, before the replica's
        ``check_batch`` (``_validate``) finds them known: the event loop goes on meanwhile,
        where checking them in ``check_batch`` would hold it for the whole batch. A tx that
        does not decode or verify is left for ``check_batch`` to refuse."""
        chain = self.chain
        unknown: list[tuple[bytes, Tx]] = []
        for raw in batch[1:]:
            digest = hashlib.sha256(raw).digest()
            if chain.known_tx(digest) is not None:
                continue
            try:
                tx = decode_tx(raw)
            except LedgerDecodeError:
                continue
            unknown.append((digest, tx))
        if unknown:
            oks = await chain.verifier.verify_many([tx for _, tx in unknown])
            good = [pair for pair, ok in zip(unknown, oks, strict=True) if ok]
            chain.remember_verified(good)
            self.batch_txs_checked += len(good)

    def _validate(self, seq: int, batch: Batch) -> bool:
        try:
            checked = check_batch(self.chain.genesis.chain_id, self.chain.validators, batch, known=self.chain.known_tx)
        except BadBatch as exc:
            log.warning("batch refused", extra=kv(seq=seq, error=str(exc)))
            return False
        self.batch_txs_checked += len(checked)
        self.chain.remember_verified(checked)
        return True

    def _want_proposal(self) -> bool:
        r = self._replica
        if not r.can_propose():
            return False
        view, seq = self._proposed
        if view == r.view and r.last_executed < seq:
            return False  # one batch of ours in flight at a time
        return bool(len(self.chain.mempool)) or self.chain.state.unbonding_pending

    def _propose_at(self) -> float:
        """When the next proposal may go: ``[ledger].block_interval`` after the last one, or
        at once when enough txs wait to fill a good part of a batch (under load, batches go
        back to back, as fast as they commit)."""
        if len(self.chain.mempool) >= min(EAGER_BATCH, self.params.max_batch_requests - 1):
            return 0.0
        return self._next_propose_at

    async def _propose(self) -> None:
        r = self._replica
        p = self.params
        txs = await self.chain.propose_txs(p.max_batch_requests - 1, p.max_batch_bytes - META_RESERVE)
        if not txs and not self.chain.state.unbonding_pending:
            return
        if not r.can_propose():
            return
        time_ms = max(int(time.time() * 1000), self.chain.tip.time_ms)
        batch = (encode_meta(self.key.account, time_ms), *txs)
        try:
            step = r.propose(batch, trio.current_time())
        except ProposalRefused as exc:
            log.info("proposal refused", extra=kv(error=str(exc)))
            return
        seq = next((rec.seq for rec in step.records if isinstance(rec, BatchRecord)), 0)
        self._proposed = (r.view, seq)
        self._next_propose_at = trio.current_time() + self.chain.cfg.block_interval
        self.batches_proposed += 1
        log.info("batch proposed", extra=kv(view=r.view, seq=seq, txs=len(txs)))
        await self._handle(step)

    # ------------------------------------------------------------ state transfer

    def _start_fetch(self, fs: FetchState) -> None:
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()
        self._fetch_scope = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._fetch, fs, self._fetch_scope)

    async def _fetch(self, fs: FetchState, scope: trio.CancelScope) -> None:
        """The chain's sync loop fetches (and checks) the blocks; wait until it has the
        checkpoint's block and compare its hash with the certified digest."""
        with scope:
            log.info("state transfer", extra=kv(seq=fs.seq, height=self.chain.tip.height))
            await self.chain.wait_height(fs.seq)
            got = self.chain.ledger.block(fs.seq).hash()
            if got != fs.state_digest:
                log.error(
                    "state transfer: our block differs from the certified checkpoint",
                    extra=kv(seq=fs.seq, ours=got.hex()[:16], certified=fs.state_digest.hex()[:16]),
                )
                return
            await self._inbox_send.send(("transferred", fs.seq, fs.state_digest))

    # ------------------------------------------------------------ control

    def register(self, server: ControlServer) -> None:
        server.register("consensus.status", self.status)

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        chain = self.chain
        out: dict[str, Any] = {
            "enabled": self.enabled,
            "role": chain.role,
            "height": chain.tip.height,
            "block_hash": chain.tip.hash.hex(),
            "test_fault": self.test_fault,
        }
        r = self.replica
        me = self.key.account
        primary = r.primary if r is not None else None
        net = self.net
        now = time.time()
        validators = []
        for i, acct in enumerate(chain.validator_order):
            heard = net.last_heard.get(acct) if net is not None else None
            validators.append(
                {
                    "index": i,
                    "account": acct.hex(),
                    "peer_id": chain.validator_peers.get(acct),
                    "self": acct == me,
                    "primary": acct == primary,
                    "last_heard": heard,
                    "last_heard_s_ago": round(now - heard, 2) if heard is not None else None,
                    "connected": net.connected.get(acct) if net is not None else None,
                    "invalid_messages": net.invalid.get(acct, 0) if net is not None else 0,
                    "evidence": self.evidence_store.counts.get(acct, 0),
                }
            )
        out["validators"] = validators
        if r is not None:
            out.update(
                view=r.view,
                active=r.active,
                primary=r.primary.hex(),
                is_primary=r.is_primary,
                stable_checkpoint={"seq": r.stable_seq, "digest": r.stable_digest.hex()},
                last_delivered=r.last_delivered,
                last_executed=r.last_executed,
                statistics={
                    **r.statistics(),
                    "batches_proposed": self.batches_proposed,
                    "batches_committed": self.batches_committed,
                    "evidence": self.evidence,
                    "batch_txs_checked": self.batch_txs_checked,
                    "records_appended": self.records.appended,
                    "messages_sent": net.sent if net else 0,
                    "messages_received": net.received if net else 0,
                    "messages_dropped": net.dropped if net else 0,
                },
            )
        return out


__all__ = ["ConsensusService"]

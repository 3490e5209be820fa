"""The PBFT replica (Castro & Liskov), as a pure state machine.

No sockets, no clocks, no randomness: every input is a method call with the current time
``now`` (seconds, any monotonic origin), and every output is in the returned ``Step``.
The rules are in protocols/pbft.md.

How to drive this replica
-------------------------
Build it once with ``Replica(validators, signer, params, validate_batch=...)``, or after a
restart with ``Replica.restore(validators, signer, params, records, executed_seq=...)``
(which also returns a first Step). Then, from one task (calls are not thread-safe):

- **incoming bytes** on ``/prsm/pbft/1.0.0`` from a validator: ``receive(data, now)``. An
  ``InvalidMessage`` (decode error, bad signature, unknown sender, bad certificate, ...)
  means drop the message and penalise the peer; the replica is unchanged.
- **timer**: call ``tick(now)`` when ``now >= next_wakeup()`` (re-read it after every call;
  it is never None). Timeouts, view changes, STATUS and retransmissions happen there.
- **a request from the mempool** (validated there: a signed, well-formed tx):
  ``submit(request, now)``. Requests later found committed by other means (state transfer)
  or dropped by the mempool: ``forget(digests)``, or they would time out into view changes.
- **proposing**: the primary's host calls ``propose(batch, now)`` when ``can_propose()``;
  ``pending_requests()`` lists submitted requests not yet in a proposal. How many batches
  to keep in flight is host policy (the window L is the hard limit).
- **after executing** a delivered batch: ``executed(seq, state_digest, now)``, in seq order.
- **after a state transfer** asked for by ``FetchState``: ``state_transferred(seq, digest, now)``.

Every call returns a ``Step``; handle it in this order:

1. persist ``step.records`` (encode_record) and **sync**; only then
2. send ``step.messages`` (``to=None``: every other validator);
3. execute ``step.committed`` in order (delivered once each, ascending seq, each with its
   commit certificate; store block + certificate), then report ``executed``;
4. report ``step.evidence`` (two conflicting signed messages of one validator);
5. start ``step.fetch_state`` (replacing any transfer in progress);
6. hand ``step.requests`` (requests forwarded by peers) to the mempool, which validates them
   and calls ``submit``.

``validate_batch(seq, batch) -> bool`` must be deterministic: honest replicas must agree on
it. It is called when a backup accepts a PRE-PREPARE, possibly before earlier sequence
numbers have executed, so it should check what does not depend on them (decoding,
signatures, chain id, duplicates); a transaction that fails at execution is skipped by the
ledger deterministically. Batches re-proposed by a NEW-VIEW are not re-validated: a quorum
prepared them already.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .certs import GENESIS_STATE_DIGEST, ValidatorSet, sorted_sigs
from .exceptions import (
    ConfigurationError,
    HostError,
    InvalidBatch,
    NotPrimary,
    ProposalRefused,
    RecordError,
)
from .log import Slot
from .messages import (
    MAX_REQUEST_SIZE,
    Batch,
    Checkpoint,
    Commit,
    CommitCertificate,
    Committed,
    Kind,
    Message,
    NewView,
    OEntry,
    Prepare,
    PreparedCert,
    PrePrepare,
    Request,
    Signer,
    Status,
    ViewChange,
    batch_digest,
    decode,
    encode,
    encode_trusted,
    request_digest,
    signing_payload,
)
from .outputs import CommittedBatch, Evidence, FetchState, Outgoing, Step
from .params import PbftParams
from .records import (
    BatchRecord,
    CommitRecord,
    PreparedRecord,
    Record,
    StableRecord,
    ViewRecord,
    VoteRecord,
)
from .viewchange import NewViewPlan, check_new_view, check_view_change, plan_new_view

ValidateBatch = Callable[[int, Batch], bool]
OWN_VIEW_CHANGES_KEPT = 4  # past views whose VIEW-CHANGE a replica still resends to laggards
ROUND_TIMEOUT_FACTOR = 4.0  # the request timer is at least this many recent commit rounds
RETRANSMIT_REQUESTS = 64  # most requests a backup retransmits (to every replica) per status interval

_M = TypeVar("_M", Request, PrePrepare, Prepare, Commit, Checkpoint, ViewChange, NewView, Status, Committed)


def _accept_all(seq: int, batch: Batch) -> bool:
    return True


class Replica:
    """One validator's PBFT replica. Read-only attributes: ``view``, ``active`` (False while
    a view change is in progress), ``stable_seq``, ``last_delivered``, ``last_executed``."""

    def __init__(
        self,
        validators: ValidatorSet,
        signer: Signer,
        params: PbftParams,
        *,
        validate_batch: ValidateBatch = _accept_all,
        now: float = 0.0,
    ) -> None:
        params.validate()
        if not validators.is_validator(signer.public_key):
            raise ConfigurationError("this replica's key is not in the validator set")
        self.vs = validators
        self.params = params
        self.me = signer.public_key
        self._signer = signer
        self._validate = validate_batch
        self._null = batch_digest(validators.chain_id, ())
        self.view = 0
        self.active = True
        self._new_view: NewView | None = None
        self.stable_seq = 0
        self.stable_digest = GENESIS_STATE_DIGEST
        self.stable_cert: tuple[tuple[bytes, bytes], ...] = ()
        self.last_delivered = 0
        self.last_executed = 0
        self._slots: dict[int, Slot] = {}
        self._prepared: dict[int, PreparedCert] = {}
        self._commits: dict[int, CommitCertificate] = {}
        self._batches: dict[bytes, Batch] = {self._null: ()}
        self._votes: dict[tuple[Kind, int, int], bytes] = {}
        self._pp_seen: dict[tuple[int, int], PrePrepare] = {}
        self._checkpoints: dict[int, dict[bytes, Checkpoint]] = {}
        self._own_checkpoints: dict[int, bytes] = {}
        self._vc_current: dict[bytes, ViewChange] = {}
        self._vc_future: dict[bytes, ViewChange] = {}
        self._outstanding: dict[bytes, tuple[bytes, float]] = {}
        self._resent: dict[bytes, float] = {}  # request digest -> when last retransmitted
        self._committed_requests: dict[bytes, int] = {}
        self._reported: set[tuple[int, bytes, int, int]] = set()
        self._failed_vcs = 0
        self._deadline: float | None = None
        self._now = now
        self._round_time = 0.0  # moving average of the time between deliveries while waiting
        self._last_progress = now  # when a batch was last delivered
        self._armed_at = now  # when the request timer was last started
        self._phase_progress = False  # the next seq to deliver moved a phase on in this step
        self._own_vcs: dict[int, ViewChange] = {}  # the VIEW-CHANGEs we sent, for recent views
        self._vc_quorum = False  # a quorum of VIEW-CHANGEs for the view we are changing to
        self._committed_at: dict[int, float] = {}  # seq -> when its commit certificate formed here
        self._committed_msgs: dict[int, Committed] = {}  # seq -> our signed COMMITTED (for laggards)
        self._next_status = now + params.status_interval
        self._status_once = False
        self._fetch: FetchState | None = None
        self._next_seq = 1
        self._progress = False
        self._out = Step()
        self._now = now

    # ======================================================== queries

    @property
    def primary(self) -> bytes:
        return self.vs.primary(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.me

    @property
    def high_watermark(self) -> int:
        return self.stable_seq + self.params.log_window

    def can_propose(self) -> bool:
        """True when ``propose`` would accept a batch now."""
        return (
            self.active
            and self.is_primary
            and (self.view == 0 or self._new_view is not None)
            and self._next_seq <= self.high_watermark
        )

    def pending_requests(self, max_count: int | None = None, max_bytes: int | None = None) -> list[bytes]:
        """Submitted requests that are neither committed nor in a proposal of this view."""
        max_count = self.params.max_batch_requests if max_count is None else max_count
        max_bytes = self.params.max_batch_bytes if max_bytes is None else max_bytes
        busy = self._in_flight()
        out: list[bytes] = []
        size = 0
        for digest, (request, _) in self._outstanding.items():
            if digest in busy:
                continue
            if len(out) >= max_count or size + len(request) > max_bytes:
                break
            out.append(request)
            size += len(request)
        return out

    def next_wakeup(self) -> float:
        """When the host must call ``tick`` next."""
        if self._deadline is None:
            return self._next_status
        return min(self._deadline, self._next_status)

    def statistics(self) -> dict[str, int]:
        return {
            "view": self.view,
            "active": int(self.active),
            "stable_seq": self.stable_seq,
            "last_delivered": self.last_delivered,
            "last_executed": self.last_executed,
            "outstanding": len(self._outstanding),
            "failed_view_changes": self._failed_vcs,
        }

    # ======================================================== host inputs

    def receive(self, data: bytes, now: float) -> Step:
        """Handle encoded bytes from a peer (raises InvalidMessage: penalise that peer)."""
        return self.receive_message(decode(data), now)

    def receive_message(self, m: Message, now: float) -> Step:
        """Handle a decoded message (``receive`` without the decoding)."""
        self.vs.check(m)
        self._out = Step()
        self._now = now
        if m.sender != self.me or isinstance(m, NewView):
            self._dispatch(m, now)
        return self._finish(now)

    def submit(self, request: bytes, now: float, *, forward: bool = True) -> Step:
        """A validated request from the mempool: remember it until it commits (its timer may
        lead to a view change) and, on a backup, forward it to the primary (``forward=False``
        when the host has sent it to the primary already; it is still retransmitted to the
        primary if it waits half the view-change timeout)."""
        if type(request) is not bytes or not 1 <= len(request) <= MAX_REQUEST_SIZE:
            raise HostError(f"a request is 1..{MAX_REQUEST_SIZE} bytes")
        self._out = Step()
        self._now = now
        digest = request_digest(request)
        if digest not in self._committed_requests and digest not in self._outstanding:
            self._outstanding[digest] = (request, now)
            if forward and not self.is_primary:
                self._send(self._sign(Request(self.me, request)), self.primary)
        return self._finish(now)

    def forget(self, digests: Iterable[bytes]) -> None:
        """Stop waiting for these requests (committed by state transfer, or evicted)."""
        for d in digests:
            self._outstanding.pop(d, None)

    def propose(self, batch: Sequence[bytes], now: float) -> Step:
        """As primary, assign the next sequence number to ``batch`` (ProposalRefused if not
        ``can_propose()`` or over the batch limits)."""
        if not self.can_propose():
            raise ProposalRefused("not the active primary, or the watermark window is full")
        batch = tuple(batch)
        try:
            self._check_batch_limits(batch)
        except InvalidBatch as exc:
            raise ProposalRefused(str(exc)) from None
        self._out = Step()
        self._now = now
        seq, digest = self._next_seq, batch_digest(self.vs.chain_id, batch)
        self._next_seq += 1
        pp = self._sign(PrePrepare(self.me, self.view, seq, digest, batch))
        self._votes[(Kind.PRE_PREPARE, self.view, seq)] = digest
        self._out.records += [BatchRecord(seq, digest, batch), VoteRecord(Kind.PRE_PREPARE, self.view, seq, digest)]
        self._batches[digest] = batch
        self._slots[seq] = Slot(self.view, pre_prepare=pp)
        self._pp_seen.setdefault((self.view, seq), pp)
        self._send(pp)
        return self._finish(now)

    def executed(self, seq: int, state_digest: bytes, now: float) -> Step:
        """The host executed the batch delivered at ``seq``; its state digest is now this."""
        if seq != self.last_executed + 1 or seq > self.last_delivered:
            raise HostError(f"executed({seq}) out of turn: last executed {self.last_executed}, "
                            f"last delivered {self.last_delivered}")
        self._out = Step()
        self._now = now
        self.last_executed = seq
        if seq % self.params.checkpoint_interval == 0:
            self._own_checkpoints[seq] = state_digest
            if seq > self.stable_seq:
                cp = self._sign(Checkpoint(self.me, seq, state_digest))
                self._send(cp)
                self._on_checkpoint(cp)
            elif seq == self.stable_seq and state_digest != self.stable_digest:
                self._start_fetch()  # our state diverged from the certified one
        return self._finish(now)

    def state_transferred(self, seq: int, state_digest: bytes, now: float) -> Step:
        """The host now holds the state at ``seq`` asked for by the last FetchState. A result
        for an older FetchState is ignored (an empty Step)."""
        self._out = Step()
        self._now = now
        if self._fetch is not None and (seq, state_digest) == (self._fetch.seq, self._fetch.state_digest):
            self._fetch = None
            self.last_executed = self.last_delivered = seq
            self._own_checkpoints[seq] = state_digest
            self._commits = {s: c for s, c in self._commits.items() if s > seq}
            self._committed_at = {s: t for s, t in self._committed_at.items() if s > seq}
            self._try_deliver()
        return self._finish(now)

    def tick(self, now: float) -> Step:
        """Timers: the view-change timeout, then STATUS and retransmissions."""
        self._out = Step()
        self._now = now
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self.active or self._vc_quorum:
                self._start_view_change(self.view + 1, now)
            else:
                self._unstick(now)
        if now >= self._next_status:
            self._next_status = now + self.params.status_interval
            self._retransmit(now)
        return self._finish(now)

    # ======================================================== restart

    @classmethod
    def restore(
        cls,
        validators: ValidatorSet,
        signer: Signer,
        params: PbftParams,
        records: Iterable[Record],
        *,
        executed_seq: int,
        validate_batch: ValidateBatch = _accept_all,
        now: float = 0.0,
    ) -> tuple[Replica, Step]:
        """Rebuild a replica from every record it asked to persist (in order, possibly
        pruned), with the host's state at ``executed_seq``. The Step re-delivers batches
        that committed but were not executed, or asks for a state transfer."""
        r = cls(validators, signer, params, validate_batch=validate_batch, now=now)
        view, active = 0, True
        for rec in records:
            if isinstance(rec, ViewRecord):
                if (rec.view, rec.active) > (view, active):
                    view, active = rec.view, rec.active
            elif isinstance(rec, VoteRecord):
                key = (rec.kind, rec.view, rec.seq)
                if r._votes.setdefault(key, rec.digest) != rec.digest:
                    raise RecordError(f"two different {rec.kind.name} votes for view {rec.view} seq {rec.seq}")
            elif isinstance(rec, BatchRecord):
                r._batches[rec.digest] = rec.batch
            elif isinstance(rec, PreparedRecord):
                old = r._prepared.get(rec.cert.seq)
                if old is None or rec.cert.view >= old.view:
                    r._prepared[rec.cert.seq] = rec.cert
            elif isinstance(rec, CommitRecord):
                r._commits[rec.cert.seq] = rec.cert
            elif rec.seq > r.stable_seq:
                r.stable_seq, r.stable_digest, r.stable_cert = rec.seq, rec.state_digest, rec.certificate
        r.view, r.active = view, active
        r.last_executed = r.last_delivered = executed_seq
        r._next_seq = r.stable_seq + 1
        r._gc(r.stable_seq)
        for (kind, v, seq), digest in sorted(r._votes.items()):
            if v != view or seq <= r.stable_seq:
                continue
            slot = r._slots.setdefault(seq, Slot(view))
            if kind is Kind.PRE_PREPARE:
                slot.pre_prepare = r._sign(PrePrepare(r.me, v, seq, digest, r._batches.get(digest, ())))
                r._next_seq = max(r._next_seq, seq + 1)
            elif kind is Kind.PREPARE:
                slot.prepares[r.me] = r._sign(Prepare(r.me, v, seq, digest))
            else:
                slot.commits[r.me] = r._sign(Commit(r.me, v, seq, digest))
            prepared = r._prepared.get(seq)
            slot.prepared = prepared is not None and prepared.view == view
        if not active:
            # The VIEW-CHANGE messages it had collected are lost: start the timer now rather
            # than wait for a quorum that the others, already further on, may never resend.
            r._vc_current[r.me] = r._own_vcs[view] = r._make_view_change()
            r._failed_vcs = 1
            r._deadline = now + params.timeout(r._failed_vcs)
            r._vc_quorum = True  # on expiry, move on to the next view (as after a quorum)
        r._status_once = True
        r._out = Step()
        if not r._can_reach(r.stable_seq):
            r._start_fetch()
        r._try_deliver()
        return r, r._finish(now)

    # ======================================================== dispatch

    def _dispatch(self, m: Message, now: float) -> None:
        if isinstance(m, PrePrepare):
            self._on_pre_prepare(m)
        elif isinstance(m, Prepare):
            self._on_prepare(m)
        elif isinstance(m, Commit):
            self._on_commit(m)
        elif isinstance(m, Checkpoint):
            self._on_checkpoint(m)
        elif isinstance(m, ViewChange):
            self._on_view_change(m, now)
        elif isinstance(m, NewView):
            self._on_new_view(m, now)
        elif isinstance(m, Status):
            self._on_status(m)
        elif isinstance(m, Committed):
            self._on_committed(m)
        else:
            digest = request_digest(m.request)
            if digest not in self._committed_requests and digest not in self._outstanding:
                self._out.requests.append(m.request)

    # ======================================================== normal case

    def _in_window(self, seq: int) -> bool:
        return self.stable_seq < seq <= self.high_watermark

    def _slot(self, seq: int) -> Slot:
        slot = self._slots.get(seq)
        if slot is None:
            slot = self._slots[seq] = Slot(self.view)
        return slot

    def _on_pre_prepare(self, pp: PrePrepare) -> None:
        if pp.sender != self.vs.primary(pp.view):
            raise NotPrimary(f"PRE-PREPARE for view {pp.view} not from its primary")
        if pp.digest != batch_digest(self.vs.chain_id, pp.batch):
            raise InvalidBatch("the batch does not match the PRE-PREPARE digest")
        self._check_batch_limits(pp.batch)
        if pp.view != self.view or not self.active or not self._in_window(pp.seq):
            return
        self._compare_pre_prepare(pp)
        slot = self._slot(pp.seq)
        if slot.pre_prepare is not None:
            if slot.pre_prepare.digest != pp.digest:
                self._evidence(slot.pre_prepare, pp)
            elif pp.digest not in self._batches:  # the batch of a NEW-VIEW re-proposal
                self._keep_batch(pp.seq, pp.digest, pp.batch)
                self._try_deliver()
            return
        voted = self._votes.get((Kind.PREPARE, pp.view, pp.seq))
        if voted is not None and voted != pp.digest:
            return  # prepared another digest before a restart: never vote twice
        slot.pre_prepare = pp
        if not self._validate(pp.seq, pp.batch):
            slot.rejected = True
            return
        self._keep_batch(pp.seq, pp.digest, pp.batch)
        self._phase_progress |= pp.seq == self.last_delivered + 1
        self._vote(Kind.PREPARE, slot, pp.seq, pp.digest)
        self._check_prepared(pp.seq, slot)

    def _on_prepare(self, p: Prepare) -> None:
        if p.view != self.view or not self.active or not self._in_window(p.seq):
            return
        if p.sender == self.vs.primary(p.view):
            return  # the primary's pre-prepare is its vote
        slot = self._slot(p.seq)
        old = slot.prepares.get(p.sender)
        if old is not None:
            if old.digest != p.digest:
                self._evidence(old, p)
            return
        slot.prepares[p.sender] = p
        self._check_prepared(p.seq, slot)

    def _on_commit(self, c: Commit) -> None:
        if c.view != self.view or not self.active or not self._in_window(c.seq):
            return
        slot = self._slot(c.seq)
        old = slot.commits.get(c.sender)
        if old is not None:
            if old.digest != c.digest:
                self._evidence(old, c)
            return
        slot.commits[c.sender] = c
        self._check_committed(c.seq, slot)

    def _check_prepared(self, seq: int, slot: Slot) -> None:
        pp = slot.pre_prepare
        if slot.prepared or pp is None or slot.rejected:
            return
        if not self.is_primary:
            mine = slot.prepares.get(self.me)
            if mine is None or mine.digest != pp.digest:
                return
        matching = slot.matching_prepares(pp.digest)
        need = self.vs.quorum - 1
        if len(matching) < need:
            return
        slot.prepared = True
        self._phase_progress |= seq == self.last_delivered + 1
        sigs = sorted_sigs((p.sender, p.signature) for p in matching)[:need]
        cert = PreparedCert(slot.view, seq, pp.digest, pp.signature, sigs)
        self._prepared[seq] = cert
        self._out.records.append(PreparedRecord(cert))
        self._vote(Kind.COMMIT, slot, seq, pp.digest)
        self._check_committed(seq, slot)

    def _check_committed(self, seq: int, slot: Slot) -> None:
        if slot.committed or seq in self._commits or seq <= self.last_delivered:
            return
        found = slot.commit_quorum(self.vs.quorum)
        if found is None:
            return
        digest, group = found
        slot.committed = True
        sigs = sorted_sigs((c.sender, c.signature) for c in group)[: self.vs.quorum]
        self._commit(CommitCertificate(slot.view, seq, digest, sigs))

    def _commit(self, cert: CommitCertificate) -> None:
        self._commits[cert.seq] = cert
        self._committed_at[cert.seq] = self._now
        self._out.records.append(CommitRecord(cert))
        self._try_deliver()

    def _try_deliver(self) -> None:
        while self._fetch is None:
            seq = self.last_delivered + 1
            cert = self._commits.get(seq)
            batch = None if cert is None else self._batches.get(cert.digest)
            if cert is None or batch is None:
                return
            self.last_delivered = seq
            self._progress = True
            if self._deadline is not None and self.active:  # something waited for this
                took = max(self._now - max(self._last_progress, self._armed_at), 0.0)
                self._round_time = took if not self._round_time else 0.75 * self._round_time + 0.25 * took
            self._out.committed.append(CommittedBatch(seq, batch, cert))
            for request in batch:
                digest = request_digest(request)
                self._outstanding.pop(digest, None)
                self._committed_requests[digest] = seq

    def _vote(self, kind: Kind, slot: Slot, seq: int, digest: bytes) -> None:
        key = (kind, self.view, seq)
        voted = self._votes.get(key)
        if voted is not None and voted != digest:
            return
        if voted is None:
            self._votes[key] = digest
            self._out.records.append(VoteRecord(kind, self.view, seq, digest))
        if kind is Kind.PREPARE:
            p = self._sign(Prepare(self.me, self.view, seq, digest))
            slot.prepares[self.me] = p
            self._send(p)
        else:
            c = self._sign(Commit(self.me, self.view, seq, digest))
            slot.commits[self.me] = c
            self._send(c)

    def _keep_batch(self, seq: int, digest: bytes, batch: Batch) -> None:
        if digest not in self._batches:
            self._batches[digest] = batch
            self._out.records.append(BatchRecord(seq, digest, batch))

    def _check_batch_limits(self, batch: Batch) -> None:
        if len(batch) > self.params.max_batch_requests:
            raise InvalidBatch(f"batch of {len(batch)} requests, over {self.params.max_batch_requests}")
        if sum(len(r) for r in batch) > self.params.max_batch_bytes:
            raise InvalidBatch(f"batch over {self.params.max_batch_bytes} bytes")
        if len({request_digest(r) for r in batch}) != len(batch):
            raise InvalidBatch("a request appears twice in the batch")

    def _in_flight(self) -> set[bytes]:
        busy: set[bytes] = set()
        for seq, slot in self._slots.items():
            if seq > self.last_delivered and slot.pre_prepare is not None:
                busy.update(request_digest(r) for r in self._batches.get(slot.pre_prepare.digest, ()))
        return busy

    # ======================================================== checkpoints, state transfer

    def _on_checkpoint(self, cp: Checkpoint) -> None:
        k = self.params.checkpoint_interval
        if cp.seq <= self.stable_seq or cp.seq % k:
            return
        per = self._checkpoints.setdefault(cp.seq, {})
        old = per.get(cp.sender)
        if old is not None:
            if old.state_digest != cp.state_digest:
                self._evidence(old, cp)
            return
        per[cp.sender] = cp
        # Bound memory: a sender keeps at most L/K + 2 pending checkpoints (its highest).
        mine = sorted(s for s, group in self._checkpoints.items() if cp.sender in group)
        for s in mine[: max(0, len(mine) - (self.params.log_window // k + 2))]:
            del self._checkpoints[s][cp.sender]
        self._check_stable(cp.seq)

    def _check_stable(self, seq: int) -> None:
        by_digest: dict[bytes, list[Checkpoint]] = {}
        for cp in self._checkpoints.get(seq, {}).values():
            by_digest.setdefault(cp.state_digest, []).append(cp)
        for digest, group in by_digest.items():
            if len(group) >= self.vs.quorum:
                sigs = sorted_sigs((c.sender, c.signature) for c in group)[: self.vs.quorum]
                self._make_stable(seq, digest, sigs)
                return

    def _make_stable(self, seq: int, digest: bytes, sigs: tuple[tuple[bytes, bytes], ...]) -> None:
        if seq <= self.stable_seq:
            return
        self.stable_seq, self.stable_digest, self.stable_cert = seq, digest, sigs
        self._out.records.append(StableRecord(seq, digest, sigs))
        own = self._own_checkpoints.get(seq)
        if (own is not None and own != digest) or not self._can_reach(seq):
            self._start_fetch()
        self._gc(seq)
        self._next_seq = max(self._next_seq, seq + 1)
        self._try_deliver()

    def _can_reach(self, seq: int) -> bool:
        """Whether delivery can reach ``seq`` from what this replica holds (no state transfer)."""
        return all(
            s in self._commits and self._commits[s].digest in self._batches
            for s in range(self.last_delivered + 1, seq + 1)
        )

    def _start_fetch(self) -> None:
        self._fetch = FetchState(self.stable_seq, self.stable_digest, self.stable_cert)
        self._out.fetch_state = self._fetch

    def _gc(self, seq: int) -> None:
        """Discard everything at or below the stable checkpoint ``seq``."""
        self._slots = {s: x for s, x in self._slots.items() if s > seq}
        self._prepared = {s: c for s, c in self._prepared.items() if s > seq}
        keep_undelivered = self._fetch is None
        self._commits = {
            s: c for s, c in self._commits.items() if s > seq or (keep_undelivered and s > self.last_delivered)
        }
        self._committed_at = {s: t for s, t in self._committed_at.items() if s in self._commits}
        self._committed_msgs = {s: x for s, x in self._committed_msgs.items() if s > seq}
        self._checkpoints = {s: g for s, g in self._checkpoints.items() if s > seq}
        self._own_checkpoints = {s: d for s, d in self._own_checkpoints.items() if s >= seq}
        self._votes = {key: d for key, d in self._votes.items() if key[2] > seq}
        self._pp_seen = {key: p for key, p in self._pp_seen.items() if key[1] > seq}
        horizon = seq - self.params.log_window
        self._committed_requests = {d: s for d, s in self._committed_requests.items() if s > horizon}
        keep = {self._null}
        keep.update(x.pre_prepare.digest for x in self._slots.values() if x.pre_prepare is not None)
        keep.update(c.digest for c in self._prepared.values())
        keep.update(c.digest for c in self._commits.values())
        self._batches = {d: b for d, b in self._batches.items() if d in keep}

    # ======================================================== view change

    def _make_view_change(self) -> ViewChange:
        prepared = tuple(c for s, c in sorted(self._prepared.items()) if s > self.stable_seq and c.view < self.view)
        return self._sign(
            ViewChange(self.me, self.view, self.stable_seq, self.stable_digest, self.stable_cert, prepared)
        )

    def _unstick(self, now: float) -> None:
        """A view change that no quorum joined within a timeout: replicas ended up in
        different views (lost VIEW-CHANGEs, a restart). Follow the smallest higher view some
        validator wants, where the others may be waiting; else keep waiting (and resending)."""
        higher = [x.view for x in self._vc_future.values() if x.view > self.view]
        if higher:
            self._start_view_change(min(higher), now)
        else:
            self._deadline = now + self.params.timeout(self._failed_vcs)

    def _start_view_change(self, view: int, now: float) -> None:
        self.view, self.active, self._new_view = view, False, None
        self._failed_vcs += 1
        # Until a quorum wants this view too, this timer only decides when to look for the
        # others in a higher view (``_unstick``); with a quorum it restarts for the NEW-VIEW.
        self._deadline = now + self.params.timeout(self._failed_vcs)
        self._vc_quorum = False
        self._out.records.append(ViewRecord(view, False))
        self._slots = {}
        self._votes = {key: d for key, d in self._votes.items() if key[1] >= view}
        vc = self._make_view_change()
        self._own_vcs = {v: x for v, x in self._own_vcs.items() if v >= view - OWN_VIEW_CHANGES_KEPT}
        self._own_vcs[view] = vc
        self._vc_current = {s: x for s, x in self._vc_future.items() if x.view == view}
        self._vc_current[self.me] = vc
        self._vc_future = {s: x for s, x in self._vc_future.items() if x.view > view}
        self._send(vc)
        self._check_view_change_quorum(now)

    def _on_view_change(self, vc: ViewChange, now: float) -> None:
        check_view_change(self.vs, vc, self.params.log_window)
        for c in vc.prepared:
            primary = self.vs.primary(c.view)
            self._compare_pre_prepare(PrePrepare(primary, c.view, c.seq, c.digest, (), c.pre_prepare_sig))
        if vc.view < self.view or (vc.view == self.view and self.active):
            if self.active and self._new_view is not None:
                self._send(self._new_view, vc.sender)  # it lags: show it the view we are in
            elif vc.view in self._own_vcs:
                # We moved on from that view change (our timer expired after a quorum) but it
                # may lack our VIEW-CHANGE for it (lost): without it, it can neither complete
                # that view nor, by the f + 1 rule alone, follow us.
                self._send(self._own_vcs[vc.view], vc.sender)
            return
        if vc.view == self.view:
            self._vc_current[vc.sender] = vc
        else:
            old = self._vc_future.get(vc.sender)
            if old is None or vc.view >= old.view:
                self._vc_future[vc.sender] = vc
            # f+1 rule: f+1 validators want a higher view, so one honest one timed out.
            higher = [x.view for x in self._vc_future.values() if x.view > self.view]
            if len(higher) >= self.vs.weak:
                self._start_view_change(min(higher), now)
                return
        self._check_view_change_quorum(now)

    def _check_view_change_quorum(self, now: float) -> None:
        if self.active or len(self._vc_current) < self.vs.quorum:
            return
        if not self._vc_quorum:  # a quorum for this view: the new primary gets a full timeout
            self._vc_quorum = True
            self._deadline = now + self.params.timeout(self._failed_vcs)
        if self.is_primary and self._new_view is None:
            self._send_new_view(now)

    def _send_new_view(self, now: float) -> None:
        own = self._vc_current[self.me]
        others = [vc for s, vc in sorted(self._vc_current.items()) if s != self.me]
        chosen = tuple(sorted([own, *others[: self.vs.quorum - 1]], key=lambda vc: vc.sender))
        plan = plan_new_view(self.vs.chain_id, chosen)
        for seq, digest in plan.entries:
            if self._votes.get((Kind.PRE_PREPARE, self.view, seq), digest) != digest:
                return  # sent another NEW-VIEW before a restart: let this view time out
        entries = []
        for seq, digest in plan.entries:
            pp = self._sign(PrePrepare(self.me, self.view, seq, digest))
            entries.append(OEntry(seq, digest, pp.signature))
            if (Kind.PRE_PREPARE, self.view, seq) not in self._votes:
                self._votes[(Kind.PRE_PREPARE, self.view, seq)] = digest
                self._out.records.append(VoteRecord(Kind.PRE_PREPARE, self.view, seq, digest))
        nv = self._sign(NewView(self.me, self.view, chosen, tuple(entries)))
        self._send(nv)
        self._install_new_view(nv, plan, now)

    def _on_new_view(self, nv: NewView, now: float) -> None:
        if nv.view < self.view or (nv.view == self.view and self._new_view is not None):
            return
        plan = check_new_view(self.vs, nv, self.params.log_window)
        self._install_new_view(nv, plan, now)

    def _install_new_view(self, nv: NewView, plan: NewViewPlan, now: float) -> None:
        if nv.view > self.view:
            self._votes = {key: d for key, d in self._votes.items() if key[1] >= nv.view}
            self._slots = {}
        self.view, self.active, self._new_view = nv.view, True, nv
        self._deadline = None
        self._out.records.append(ViewRecord(nv.view, True))
        self._vc_current = {}
        self._vc_future = {s: x for s, x in self._vc_future.items() if x.view > nv.view}
        self._slots = {s: x for s, x in self._slots.items() if x.view == nv.view}
        if plan.min_s > self.stable_seq:
            cp = plan.checkpoint
            self._make_stable(cp.stable_seq, cp.state_digest, cp.checkpoint_cert)
        for o in nv.pre_prepares:
            if o.seq <= self.stable_seq:
                continue
            pp = PrePrepare(nv.sender, nv.view, o.seq, o.digest, (), o.signature)
            self._compare_pre_prepare(pp)
            slot = self._slot(o.seq)
            if slot.pre_prepare is not None:
                if slot.pre_prepare.digest != o.digest:
                    self._evidence(slot.pre_prepare, pp)
                continue
            slot.pre_prepare = dataclasses.replace(pp, batch=self._batches.get(o.digest, ()))
            if not self.is_primary:
                self._vote(Kind.PREPARE, slot, o.seq, o.digest)
            self._check_prepared(o.seq, slot)
        if self.is_primary:
            self._next_seq = max(self._next_seq, plan.max_s + 1, self.stable_seq + 1)

    # ======================================================== catching up

    def _retransmit(self, now: float) -> None:
        """Every status interval: STATUS when waiting for anything, our VIEW-CHANGE while
        changing views, and requests the primary seems not to have."""
        waiting = (
            self._status_once
            or not self.active
            or (self.view > 0 and self._new_view is None)
            or bool(self._outstanding)
            or any(s > self.last_delivered for s in self._slots)
            or any(s > self.last_delivered for s in self._commits)
            or any(s > self.last_executed or self.me in g for s, g in self._checkpoints.items())
        )
        self._status_once = False
        if waiting:
            has_view = self.active and (self.view == 0 or self._new_view is not None)
            self._send(self._sign(Status(self.me, self.view, has_view, self.stable_seq, self.last_executed)))
        if not self.active:
            self._send(self._vc_current[self.me])
        elif not self.is_primary and self._outstanding:
            self._retransmit_requests(now)

    def _retransmit_requests(self, now: float) -> None:
        """Requests not in a proposal that the primary may lack: those waiting half the
        view-change timeout when nothing was delivered for that long, or waiting four request
        timeouts while batches commit (a long queue under load is not a lost request). Oldest
        first, each at most once per timeout, and at most RETRANSMIT_REQUESTS per status
        interval, so that a backlog never turns into a storm of signed REQUESTs. They go to
        every replica, as a Castro-Liskov client broadcasts a request that got no reply: the
        host may have sent a request to the primary alone, and the other replicas must time
        it too, or a primary that drops it is never replaced."""
        timeout = self.params.view_change_timeout
        old = now - timeout / 2
        if self._last_progress > old:
            old = now - 4 * self._request_timeout()
        self._resent = {d: t for d, t in self._resent.items() if d in self._outstanding and t > now - timeout}
        busy: set[bytes] | None = None
        sent = 0
        for digest, (request, since) in self._outstanding.items():  # in arrival order
            if since > old or sent >= RETRANSMIT_REQUESTS:
                break
            if digest in self._resent:
                continue
            if busy is None:
                busy = self._in_flight()
            if digest in busy:
                continue
            self._send(self._sign(Request(self.me, request)))
            self._resent[digest] = now
            sent += 1

    def _on_status(self, st: Status) -> None:
        peer = st.sender
        if self.active and self._new_view is not None and (
            st.view < self.view or (st.view == self.view and not st.has_view)
        ):
            self._send(self._new_view, peer)
        if self.stable_seq > st.stable_seq:
            for key, sig in self.stable_cert:
                self._send(Checkpoint(key, self.stable_seq, self.stable_digest, sig), peer)
        for seq, group in sorted(self._checkpoints.items()):
            own = group.get(self.me)
            if own is not None and seq > st.stable_seq:
                self._send(own, peer)  # not stable yet: the peer may have lost it
        same_view = self.active and st.view == self.view and st.has_view
        start = max(st.last_executed, self.stable_seq) + 1
        sent_blocks = 0
        recent = self._now - self.params.status_interval
        for seq in range(start, self.high_watermark + 1):
            cert = self._commits.get(seq)
            if cert is not None and cert.digest in self._batches:
                # Not for a seq that committed here just now: the peer is most likely
                # committing it too (a COMMITTED carries the whole batch).
                if sent_blocks < self.params.checkpoint_interval and self._committed_at.get(seq, 0.0) <= recent:
                    sent_blocks += 1
                    self._send(self._committed_message(seq, cert), peer)
                continue
            slot = self._slots.get(seq)
            if not same_view or slot is None:
                continue
            pp = slot.pre_prepare
            if pp is not None and pp.sender == self.me and pp.digest in self._batches:
                self._send(dataclasses.replace(pp, batch=self._batches[pp.digest]), peer)
            for vote in (slot.prepares.get(self.me), slot.commits.get(self.me)):
                if vote is not None:
                    self._send(vote, peer)

    def _committed_message(self, seq: int, cert: CommitCertificate) -> Committed:
        """Our COMMITTED for ``seq``, signed once however often a laggard asks."""
        cached = self._committed_msgs.get(seq)
        if cached is None or cached.certificate != cert:
            cached = self._committed_msgs[seq] = self._sign(Committed(self.me, self._batches[cert.digest], cert))
            for old in [s for s in self._committed_msgs if s <= self.stable_seq]:
                del self._committed_msgs[old]
        return cached

    def _on_committed(self, m: Committed) -> None:
        cert = m.certificate
        if cert.digest != batch_digest(self.vs.chain_id, m.batch):
            raise InvalidBatch("the COMMITTED batch does not match its certificate")
        known = self._commits.get(cert.seq)
        if cert.seq <= self.last_delivered or not self._in_window(cert.seq):
            return
        if known is not None and (known.digest != cert.digest or cert.digest in self._batches):
            return
        self.vs.check_commit_cert(cert)
        self._keep_batch(cert.seq, cert.digest, m.batch)
        if known is None:
            self._commit(cert)
        else:
            self._try_deliver()

    # ======================================================== plumbing

    def _compare_pre_prepare(self, pp: PrePrepare) -> None:
        seen = self._pp_seen.get((pp.view, pp.seq))
        if seen is None:
            if self._in_window(pp.seq):
                self._pp_seen[(pp.view, pp.seq)] = pp
        elif seen.digest != pp.digest:
            self._evidence(seen, pp)

    def _evidence(self, first: Message, second: Message) -> None:
        view = getattr(first, "view", 0)
        seq = getattr(first, "seq", 0)
        key = (first.kind.value, first.sender, view, seq)
        if key in self._reported:
            return
        self._reported.add(key)
        self._out.evidence.append(Evidence(first.sender, encode(first), encode(second)))

    def _sign(self, m: _M) -> _M:
        return dataclasses.replace(m, signature=self._signer.sign(signing_payload(m, self.vs.chain_id)))

    def _send(self, m: Message, to: bytes | None = None) -> None:
        self._out.messages.append(Outgoing(to, encode_trusted(m)))

    def _request_timeout(self) -> float:
        """How long what waits may wait for progress before this replica votes for a view
        change: the view-change timeout (doubled per failed view change), but at least
        ROUND_TIMEOUT_FACTOR times the recent round time (between two deliveries while
        something waited), so that a loaded network whose rounds have grown slow is not taken
        for a faulty primary (capped at the maximum timeout: a primary cannot stretch it
        without bound)."""
        base = self.params.timeout(self._failed_vcs)
        return max(base, min(ROUND_TIMEOUT_FACTOR * self._round_time, self.params.max_view_change_timeout))

    def _finish(self, now: float) -> Step:
        if self._commits.get(self.last_delivered + 1) is not None:
            self._try_deliver()  # a batch may have arrived (PRE-PREPARE, NEW-VIEW) after its certificate
        if self._progress:
            self._progress = False
            self._last_progress = now
            if self.active:
                self._failed_vcs = 0
                self._deadline = None  # restart the timer for what is still waiting
        if self.active:
            waiting = bool(self._outstanding) or any(
                s > self.last_delivered and x.pre_prepare is not None for s, x in self._slots.items()
            )
            if self._fetch is not None or not waiting:
                self._deadline = None
            elif self._deadline is None:
                self._deadline = now + self._request_timeout()
                self._armed_at = now
            elif self._phase_progress:
                # The next seq was pre-prepared or prepared: the primary did its part, the
                # round is under way. At most twice per seq, so a primary cannot stall forever.
                self._deadline = max(self._deadline, now + self._request_timeout())
        self._phase_progress = False
        out, self._out = self._out, Step()
        return out

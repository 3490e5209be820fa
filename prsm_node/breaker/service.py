"""The breaker service: gossip of halt votes on ``prsm/breaker/1``, the tally, persistence,
catch-up on ``/prsm/breaker/1.0.0`` and the ``is_halted`` hook enforcement obeys.

Every vote is checked by the topic validator *before* gossipsub forwards it: decode, then
``check_vote`` against the stake table of the last committed block. The validator is
synchronous, so "seen" marking and counting happen without a checkpoint in between: one vote
arriving from several peers at once is counted once. An accepted vote is counted in memory at
once (enforcement sees it immediately) and written, with its model's record, in one synced
batch by the writer task a moment later. Own votes are written before they are published.

Gossip alone can lose a vote in a burst (a full queue, a peer outside every mesh when the vote
passed). Anti-entropy repairs that: every ``sync_interval`` (backing off to
``sync_idle_interval`` while nothing changes) the node compares a digest of its votes with a
random peer's and fetches the buckets that differ (protocols/breaker.md, "Anti-entropy").
Per-voter limits (limits.py) bound what one voter can make the network relay; validators
record the votes they accept in the ledger (recorder.py).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from .._trio import TaskStatus
from ..genesis import Genesis
from ..keys import NodeKey
from ..logs import kv
from ..store import Store
from ..wire import guarded_handler, read_frame, write_frame
from . import net
from .exceptions import Malformed, NotRunning, RateLimited, Replayed, VoteRejected
from .limits import VoteLimiter
from .messages import (
    MAX_REQUEST_SIZE,
    Digest,
    ErrorCode,
    GetBuckets,
    GetDigest,
    catchup_order,
    decode_request,
    encode_message,
    make_digest,
    select_bucket_votes,
    select_votes,
)
from .messages import Error as ErrorMessage
from .params import BreakerParams
from .recorder import FALLBACK_DELAY, LedgerRecorder
from .store import BreakerStore
from .tally import ModelState, StakeTable, Tally, Transition
from .votes import Action, Vote, check_vote, decode_vote, encode_vote, sign_vote, vote_id

log = logging.getLogger(__name__)

TOPIC = "prsm/breaker/1"
MAX_FAULTS = 3  # peer-fault rejections before a peer is blacklisted and disconnected
MAX_REQUESTS_PER_STREAM = 4096
INBOUND_IDLE_TIMEOUT = 30.0
CATCHUP_PEERS_ON_START = 3
CATCHUP_INTERVAL = 60.0  # one random peer, in case gossip missed something
CATCHUP_PEER_COOLDOWN = 10.0  # at most one catch-up from the same peer in this many seconds
CATCHUP_PARALLEL = 4
SYNC_INTERVAL = 1.0  # s between anti-entropy exchanges while votes move
SYNC_IDLE_INTERVAL = 8.0  # s: the interval doubles up to this while digests match
SYNC_GRACE_MS = 1500  # a digest leaves out votes younger than this: gossip is still delivering them
SYNC_ACTIVE = 10.0  # s after the last new vote during which the interval stays short


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Statistics:
    accepted: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    caught_up: int = 0
    catchup_errors: int = 0
    blacklisted: int = 0
    repaired: int = 0  # votes counted from anti-entropy
    syncs: int = 0
    sync_mismatches: int = 0
    sync_errors: int = 0
    # why exchanges (anti-entropy and catch-up) failed: "timeout", or the error's kind
    failures: collections.Counter[str] = field(default_factory=collections.Counter)


class _Notifee(INotifee):
    """Tells the service about new connections (for catch-up); never blocks the swarm."""

    def __init__(self, send: trio.MemorySendChannel[ID]) -> None:
        self._send = send

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        try:
            self._send.send_nowait(conn.muxed_conn.peer_id)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # catch-up from this peer is skipped; the periodic one covers it
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class BreakerService:
    def __init__(
        self,
        host: IHost,
        store: Store,
        chain: Any,
        key: NodeKey,
        genesis: Genesis,
        *,
        heartbeat_interval: int = net.HEARTBEAT_INTERVAL,
        catchup_interval: float = CATCHUP_INTERVAL,
        max_faults: int = MAX_FAULTS,
        submit_tx: Callable[..., Awaitable[Any]] | None = None,
        sync_interval: float = SYNC_INTERVAL,
        sync_idle_interval: float = SYNC_IDLE_INTERVAL,
        record_fallback_delay: float = FALLBACK_DELAY,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.catchup_interval = catchup_interval
        self.max_faults = max_faults
        self.host = host
        self.chain = chain
        self.key = key
        self.chain_id = genesis.chain_id
        self.params = BreakerParams.from_genesis_params(genesis.params)
        self.store = BreakerStore(store.namespace("breaker"))
        self.tally = Tally(self.params, local_voter=key.account)
        self.pubsub: Pubsub | None = None
        self.stats = Statistics()
        self._stakes: tuple[int, StakeTable] | None = None
        self._evaluated: StakeTable | None = None  # the stake table every model was last evaluated against
        self._own: set[bytes] = set()  # vote ids of own votes being published
        self._dirty_models: set[bytes] = set()
        self._dirty_votes: list[Vote] = []
        self._write_lock = trio.Lock()
        self._dirty = trio.Event()
        self._changed = trio.Event()
        self._halted_since: dict[bytes, int] = {}  # model -> this node's clock (ms) when it halted here
        self._faults: collections.Counter[ID] = collections.Counter()
        self._last_catchup: dict[ID, float] = {}
        self._nursery: trio.Nursery | None = None
        self._connected_send, self._connected_recv = trio.open_memory_channel[ID](1024)
        self.on_change: list[Callable[[bytes, bool], None]] = []  # (model, halted) listeners
        self.sync_interval = sync_interval
        self.sync_idle_interval = max(sync_idle_interval, sync_interval)
        self.limiter = VoteLimiter(self.params)
        self.recorder = (
            LedgerRecorder(chain, submit_tx, fallback_delay=record_fallback_delay)
            if submit_tx is not None and getattr(chain, "is_validator", False)
            else None
        )
        self._last_new_vote = -float("inf")

    # ------------------------------------------------------------ the hook

    def is_halted(self, model_id: bytes) -> bool:
        """True while ``model_id`` is halted network-wide or self-halted by this node: serve,
        fetch and run nothing of it."""
        return self.tally.is_halted(model_id)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.tally = await trio.to_thread.run_sync(lambda: self.store.load(self.params, local_voter=self.key.account))
        now = _now_ms()
        for model in self.tally.halted_models():
            self._halted_since[model] = now
        self._evaluated = self._stake_table()
        changes = self.tally.recompute(self._evaluated, height=self.chain.tip.height)
        self._note_changes([m for m, _ in changes])
        if changes:
            await trio.to_thread.run_sync(lambda: self.store.save_models(self.tally, [m for m, _ in changes]))
        log.info(
            "breaker loaded",
            extra=kv(models=len(self.tally.models()), halted=len(self.tally.halted_models())),
        )
        single_host = all(a.startswith(("/ip4/127.", "/ip6/::1")) for a in (str(x) for x in self.host.get_addrs()))
        pubsub, router = net.build_pubsub(
            self.host, single_host=single_host, heartbeat_interval=self.heartbeat_interval
        )
        self.pubsub = pubsub
        self.host.set_stream_handler(net.CATCHUP, guarded_handler(str(net.CATCHUP), self._serve_catchup))
        self.host.get_network().register_notifee(_Notifee(self._connected_send))
        try:
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                pubsub.set_topic_validator(TOPIC, self._validate, False)
                subscription = await pubsub.subscribe(TOPIC)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._drain, subscription)
                    nursery.start_soon(self._writer_loop)
                    nursery.start_soon(self._block_loop)
                    nursery.start_soon(self._catchup_loop)
                    nursery.start_soon(self._sync_loop)
                    if self.recorder is not None:
                        for vote in self.tally.votes():  # those accepted before a restart, too
                            self.recorder.add(vote)
                        nursery.start_soon(self.recorder.run)
                    for peer in list(self.host.get_network().connections):
                        nursery.start_soon(pubsub.ensure_peer_stream, peer, 5.0)
                        self._connected_send.send_nowait(peer)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self.pubsub = None
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._flush()

    async def _drain(self, subscription: Any) -> None:
        """Votes were counted by the validator; the subscription only has to be emptied."""
        while True:
            await subscription.get()

    # ------------------------------------------------------------ stake

    def _stake_table(self) -> StakeTable:
        height = self.chain.tip.height
        if self._stakes is None or self._stakes[0] != height:
            self._stakes = (height, StakeTable.from_ledger(self.chain.state))
        return self._stakes[1]

    async def _block_loop(self) -> None:
        """After every committed block that changed the stake table, re-evaluate the tally
        against it. A model's state depends only on its votes and the stakes, and each vote
        is evaluated as it is counted: while the stakes stay the same (blocks of transfers,
        recorded votes) there is nothing to re-evaluate, and every model's votes would be
        summed again for nothing after each block."""
        while True:
            height = self.chain.tip.height
            await self.chain.wait_height(height + 1)
            stakes = self._stake_table()
            if stakes == self._evaluated:
                continue
            self._evaluated = stakes
            changes = self.tally.recompute(stakes, height=self.chain.tip.height)
            if changes:
                for model, t in changes:
                    log.info("breaker state changed by stake", extra=kv(model=model.hex()[:16], state=t.state.name))
                self._note_changes([m for m, _ in changes])
                self._mark_dirty([m for m, _ in changes], [])

    # ------------------------------------------------------------ gossip

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """The topic validator: runs before gossipsub forwards anything (synchronous)."""
        data = bytes(msg.data)
        if forwarder == self.host.get_id():
            digest = message_digest(data)
            if digest in self._own:
                self._own.discard(digest)
                return True
        relay = None if forwarder == self.host.get_id() else forwarder
        try:
            vote = decode_vote(data)
            self.accept(vote, max_age_ms=self.params.max_vote_age_ms, limit=True, relay=relay)
        except VoteRejected as exc:
            self.stats.rejected[exc.code] += 1
            if isinstance(exc, Replayed):  # never valid again (epochs only grow): drop copies unchecked
                self._mark_seen(data)
            self._poke()
            if exc.peer_fault and forwarder != self.host.get_id():
                self._penalise(forwarder, exc)
            else:
                log.debug("vote dropped", extra=kv(peer=str(forwarder), code=exc.code, error=str(exc)))
            return False
        return True

    def accept(self, vote: Vote, *, max_age_ms: int | None, limit: bool = False, relay: ID | None = None) -> None:
        """Check ``vote`` (VoteRejected says why not) and count it; persisted shortly after.

        ``limit``: apply the per-voter vote limits (gossip and own votes; catch-up and
        anti-entropy fetch current votes and are bounded by their pages). ``relay``: the peer
        that forwarded it, penalised when it relays far over the limits."""
        stakes = self._stake_table()
        now_ms = _now_ms()
        check_vote(
            vote,
            chain_id=self.chain_id,
            stake_of=stakes.stake_of,
            now_ms=now_ms,
            max_age_ms=max_age_ms,
            max_future_ms=self.params.max_vote_future_ms,
            last_epoch_of=self.tally.last_epoch,
        )
        if relay is not None and self.limiter.relay_over(relay.to_bytes(), vote.voter, vote.model, now_ms):
            self._penalise(relay, RateLimited(f"{relay} relays votes of {vote.voter.hex()} far over the vote limits"))
        if limit:
            self.limiter.check(vote.voter, vote.model, now_ms)
        added = self.tally.add(vote, stakes)
        self.limiter.record(vote.voter, vote.model, now_ms)
        self._last_new_vote = trio.current_time()
        if self.recorder is not None:
            self.recorder.add(vote)
        self.stats.accepted += 1
        if added.transition is not None:
            self._log_transition(vote.model, added.transition)
        self._note_changes([vote.model])
        self._mark_dirty([vote.model], [vote])

    def _mark_seen(self, data: bytes) -> None:
        """Mark the gossipsub message carrying ``data`` as seen: later copies of it are
        dropped before their signatures are checked, and never relayed."""
        if self.pubsub is not None:
            self.pubsub.seen_messages.add(net.message_id(rpc_pb2.Message(data=data)))

    def _penalise(self, peer: ID, exc: VoteRejected) -> None:
        self._faults[peer] += 1
        log.info("peer forwarded an invalid vote", extra=kv(peer=str(peer), code=exc.code, count=self._faults[peer]))
        if self._faults[peer] >= self.max_faults and self.pubsub is not None and self._nursery is not None:
            if not self.pubsub.is_peer_blacklisted(peer):
                self.stats.blacklisted += 1
                log.warning("peer blacklisted for invalid votes", extra=kv(peer=str(peer)))
                self.pubsub.add_to_blacklist(peer)
                self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: ID) -> None:
        try:
            await self.host.disconnect(peer)
        except Exception as exc:  # already gone
            log.debug("disconnect failed", extra=kv(peer=str(peer), error=repr(exc)))

    # ------------------------------------------------------------ own votes

    async def vote(self, model: bytes, action: Action, reason: str) -> Vote:
        """Sign a vote with the node key (epoch: last + 1), count it here at once (a halt
        self-halts this node), persist it, then publish it."""
        last = self.tally.last_epoch(self.key.account, model) or 0
        vote = sign_vote(
            self.key.signing_key,
            chain_id=self.chain_id,
            model=model,
            action=action,
            epoch=last + 1,
            timestamp_ms=_now_ms(),
            reason=reason,
        )
        self.accept(vote, max_age_ms=self.params.max_vote_age_ms, limit=True)
        await self._flush()
        await self.publish(vote)
        return vote

    async def publish(self, vote: Vote) -> None:
        """Publish an already counted vote on the topic."""
        if self.pubsub is None:
            raise NotRunning("the breaker service is not running")
        data = encode_vote(vote)
        self._own.add(message_digest(data))
        await self.pubsub.publish(TOPIC, data)

    # ------------------------------------------------------------ persistence

    def _mark_dirty(self, models: list[bytes], votes: list[Vote]) -> None:
        self._dirty_models.update(models)
        self._dirty_votes.extend(votes)
        self._dirty.set()

    async def _writer_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        """Write every vote and record changed since the last write, in one synced batch."""
        async with self._write_lock:
            if not self._dirty_models and not self._dirty_votes:
                return
            models, self._dirty_models = sorted(self._dirty_models), set()
            latest: dict[tuple[bytes, bytes], Vote] = {}
            for v in self._dirty_votes:
                latest[(v.model, v.voter)] = v
            self._dirty_votes = []
            tally = self.tally
            # Snapshot the records now: the tally moves on while the thread writes.
            records = {m: tally.record(m) for m in models}
            await trio.to_thread.run_sync(lambda: self.store.save_records(records, latest.values()))

    # ------------------------------------------------------------ state changes

    def _note_changes(self, models: list[bytes]) -> None:
        now = _now_ms()
        for model in models:
            halted = self.tally.is_halted(model)
            was = model in self._halted_since
            if halted and not was:
                self._halted_since[model] = now
            elif not halted and was:
                del self._halted_since[model]
            if halted != was:
                for listener in self.on_change:
                    listener(model, halted)
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds; re-checked after every vote counted or dropped."""
        while not condition():
            await self._changed.wait()

    def _log_transition(self, model: bytes, t: Transition) -> None:
        log.info(
            "breaker state changed",
            extra=kv(
                model=model.hex()[:16],
                state=t.state.name,
                halt=t.halt_stake,
                resume=t.resume_stake,
                total=t.total_stake,
            ),
        )

    def halted_since(self, model: bytes) -> int | None:
        return self._halted_since.get(model)

    async def wait_state(self, model: bytes, halted: bool) -> None:
        while self.tally.is_halted(model) != halted:
            await self._changed.wait()

    async def wait_network_state(self, model: bytes, state: ModelState) -> None:
        while self.tally.state(model) is not state:
            await self._changed.wait()

    async def wait_votes(self, count: int) -> None:
        while self.tally.vote_count() < count:
            await self._changed.wait()

    # ------------------------------------------------------------ catch-up

    async def _serve_catchup(self, stream: INetStream) -> None:
        for _ in range(MAX_REQUESTS_PER_STREAM):
            try:
                with trio.fail_after(INBOUND_IDLE_TIMEOUT):
                    body = await read_frame(stream, MAX_REQUEST_SIZE)
            except StreamEOF:
                return
            try:
                request = decode_request(body)
            except Malformed as exc:
                await write_frame(stream, encode_message(ErrorMessage(ErrorCode.BAD_REQUEST, str(exc)[:200])))
                return
            if isinstance(request, GetDigest):
                digest = make_digest(self.tally.votes(), request.before_ms)
                await write_frame(stream, encode_message(Digest(request.before_ms, digest)))
            elif isinstance(request, GetBuckets):
                await write_frame(stream, encode_message(select_bucket_votes(self.tally.votes(), request)))
            else:
                reply = select_votes(self.tally.catchup_votes(request.model or None), request)
                await write_frame(stream, encode_message(reply))

    async def _catchup_loop(self) -> None:
        """Catch up from each peer that connects (at most once per cooldown), and from one
        random peer every CATCHUP_INTERVAL."""
        limiter = trio.CapacityLimiter(CATCHUP_PARALLEL)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._periodic_catchup, limiter)
            async for peer in self._connected_recv:
                if peer == self.host.get_id():
                    continue
                last = self._last_catchup.get(peer)
                if last is not None and trio.current_time() - last < CATCHUP_PEER_COOLDOWN:
                    continue
                self._last_catchup[peer] = trio.current_time()
                nursery.start_soon(self._catch_up_limited, peer, limiter)

    async def _periodic_catchup(self, limiter: trio.CapacityLimiter) -> None:
        while True:
            await trio.sleep(self.catchup_interval * random.uniform(0.75, 1.25))
            peers = list(self.host.get_network().connections)
            if peers:
                await self._catch_up_limited(random.choice(peers), limiter)

    async def _catch_up_limited(self, peer: ID, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            await self.catch_up(peer)

    async def catch_up(self, peer: ID) -> int:
        """Fetch the votes ``peer`` serves and apply them in catch-up order, each checked
        (no age limit). Returns how many were counted."""
        counted = 0

        def count(votes: Sequence[Vote]) -> None:
            nonlocal counted
            n = self._accept_from(peer, votes, skip_known=False)
            counted += n
            self.stats.caught_up += n

        try:
            await net.fetch_votes(self.host, peer, count)
        except Malformed as exc:
            self.stats.catchup_errors += 1
            self._penalise(peer, exc)
        except (net.BreakerNetError, trio.TooSlowError) as exc:
            self.stats.catchup_errors += 1
            self.stats.failures[_failure_kind(exc)] += 1
            log.debug("catch-up failed", extra=kv(peer=str(peer), error=str(exc), counted=counted))
        if counted:
            log.info("caught up", extra=kv(peer=str(peer), votes=counted))
        return counted

    def _accept_from(self, peer: ID, votes: Iterable[Vote], *, skip_known: bool) -> int:
        """Count the votes ``peer`` sent, in catch-up order, each checked (no age limit); a
        vote that is its fault gets it penalised. ``skip_known``: a vote no newer than the
        voter's epoch here is passed over before its signature check. Returns how many counted."""
        counted = 0
        for vote in catchup_order(votes):
            if skip_known:
                last = self.tally.last_epoch(vote.voter, vote.model)
                if last is not None and last >= vote.epoch:
                    continue
            try:
                self.accept(vote, max_age_ms=None)
            except VoteRejected as exc:
                if exc.peer_fault:
                    self._penalise(peer, exc)
                continue
            # Counted here already: gossiped copies still on their way are neither checked
            # nor relayed (this node's peers repair their own gaps by anti-entropy too).
            self._mark_seen(encode_vote(vote))
            counted += 1
        return counted

    # ------------------------------------------------------------ anti-entropy

    async def _sync_loop(self) -> None:
        """Compare digests with one random peer every interval; the interval doubles (up to
        sync_idle_interval) while they match and no new vote came, and is short otherwise."""
        interval = self.sync_interval
        while True:
            await trio.sleep(interval * random.uniform(0.8, 1.2))
            peers = [p for p in self.host.get_network().connections if p != self.host.get_id()]
            if not peers:
                continue
            differed = await self.sync_with(random.choice(peers))
            active = trio.current_time() - self._last_new_vote < SYNC_ACTIVE
            interval = self.sync_interval if differed or active else min(2 * interval, self.sync_idle_interval)

    async def sync_with(self, peer: ID) -> int:
        """One anti-entropy exchange with ``peer``: fetch the buckets whose digests differ
        and count what they hold that is new here (catch-up rules). Returns the number of
        differing buckets (0 when in sync or on error)."""
        self.stats.syncs += 1
        before_ms = _now_ms() - SYNC_GRACE_MS
        repaired = differ = 0

        def count(votes: Sequence[Vote]) -> None:
            nonlocal repaired
            n = self._accept_from(peer, votes, skip_known=True)
            repaired += n
            self.stats.repaired += n

        try:
            differ = await net.sync_votes(
                self.host, peer, before_ms, lambda before: make_digest(self.tally.votes(), before), count
            )
        except Malformed as exc:
            self.stats.sync_errors += 1
            self._penalise(peer, exc)
        except (net.BreakerNetError, trio.TooSlowError) as exc:
            self.stats.sync_errors += 1
            self.stats.failures[_failure_kind(exc)] += 1
            log.debug("anti-entropy failed", extra=kv(peer=str(peer), error=str(exc), repaired=repaired))
        if differ:
            self.stats.sync_mismatches += 1
        if repaired:
            log.info("votes repaired by anti-entropy", extra=kv(peer=str(peer), votes=repaired))
        return differ

    # ------------------------------------------------------------ views

    def mesh_peers(self) -> int:
        if self.pubsub is None:
            return 0
        router = self.pubsub.router
        mesh = getattr(router, "mesh", {})
        return len(mesh.get(TOPIC, ()))

    def stream_peers(self) -> int:
        """Peers this node has its own gossip stream to (only those can join its mesh)."""
        if self.pubsub is None:
            return 0
        return len(getattr(self.pubsub.router, "peer_protocol", {}))

    def topic_peers(self) -> int:
        if self.pubsub is None:
            return 0
        return len(self.pubsub.peer_topics.get(TOPIC, ()))

    def statistics(self) -> dict[str, Any]:
        return {
            "models": len(self.tally.models()),
            "halted": len(self.tally.halted_models()),
            "votes": self.tally.vote_count(),
            "accepted": self.stats.accepted,
            "rejected": dict(self.stats.rejected),
            "caught_up": self.stats.caught_up,
            "catchup_errors": self.stats.catchup_errors,
            "blacklisted": self.stats.blacklisted,
            "repaired": self.stats.repaired,
            "syncs": self.stats.syncs,
            "sync_mismatches": self.stats.sync_mismatches,
            "sync_errors": self.stats.sync_errors,
            "exchange_failures": dict(self.stats.failures),
            "mesh_peers": self.mesh_peers(),
            "topic_peers": self.topic_peers(),
            "stream_peers": self.stream_peers(),
            **(self.recorder.statistics() if self.recorder is not None else {}),
        }


def _failure_kind(exc: Exception) -> str:
    """A short, bounded label for why an exchange failed (for statistics)."""
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return getattr(exc, "kind", "error")


def message_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


__all__ = ["TOPIC", "BreakerService", "vote_id"]

"""Gossipsub for topic ``prsm/breaker/1``, set up deliberately (see PITFALLS and breaker.md,
"Service parameters"), and the client side of the catch-up protocol ``/prsm/breaker/1.0.0``.

py-libp2p 0.8.1 keeps two of the limits breaker.md asks to raise as module constants (the
outbound queue per peer, 32, and the subscription channel, 32) that its ``Pubsub`` reads when
a peer or a subscription is added; :func:`tune_pubsub_module` sets them, and stops its routers
building signed peer records that are never sent, once per process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub import floodsub as floodsub_module
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue

from ..wire import read_frame, write_frame
from .exceptions import BreakerError
from .messages import (
    MAX_REPLY_SIZE,
    PROTOCOL_ID,
    Digest,
    GetBuckets,
    GetDigest,
    GetVotes,
    Votes,
    bucket_set,
    decode_message,
    differing_buckets,
    encode_message,
    next_bucket_request,
    next_request,
)
from .votes import Vote

log = logging.getLogger(__name__)

CATCHUP = TProtocol(PROTOCOL_ID)
GOSSIP_REPAIR_PER_SECOND = 1024.0
HEARTBEAT_INTERVAL = 1  # seconds; py-libp2p's default (120) delays mesh repair by minutes
# D 4 (D_low 3, D_high 6) rather than gossipsub's 6/4/12: every mesh peer is one more copy of
# each vote to receive, decode and drop as a duplicate, and on a 2-core machine running dozens
# of nodes that CPU is what delays delivery. A mesh of degree 4 still reaches 50 nodes in
# about log4(50) ~ 3 hops, and flood publishing sends a voter's own vote to all its peers.
DEGREE, DEGREE_LOW, DEGREE_HIGH = 4, 3, 6
# 10 s, not 60: with a small D_high pruning is frequent, and a node pruned by several peers at
# once must not sit below D_low (or with no mesh) for a minute.
PRUNE_BACKOFF = 10
# A peer becomes a graft candidate again this long after its backoff ends (go-libp2p waits
# two heartbeats too): the peer's own backoff on us ends at about the same time, rounded to
# whole seconds on each side, and a GRAFT it receives while still in backoff is answered with
# a PRUNE and a new backoff on both sides, a churn that can keep a node out of every mesh.
BACKOFF_SLACK = 3
SPAM_LIMIT_PER_SECOND = 1024  # per topic per forwarding peer (a 1 s window: the burst, too)
OUTBOUND_QUEUE = 1024
# One coalesced RPC stays within one Noise message (65,535 bytes with its tag and length).
COALESCE_BYTES = 60_000
SUBSCRIPTION_CHANNEL = 1024
SEEN_TTL = 600  # s: as long as the vote freshness window, so a vote is not taken twice
MAX_INBOUND_RPC = 1 << 20
# Catch-up and anti-entropy: opening the stream and each request/reply get STEP_TIMEOUT, the
# whole exchange EXCHANGE_LIMIT. Under load (50 nodes on 2 cores) a reply can take seconds;
# one 10 s bound on the whole exchange lost most exchanges, and every page they had fetched.
STEP_TIMEOUT = 10.0
EXCHANGE_LIMIT = 60.0
MAX_CATCHUP_PAGES = 4096  # 1 M votes: a bound on what one peer can make us read
MAX_SYNC_PAGES = 16  # 4096 votes per anti-entropy exchange; the next exchange goes on


class BreakerNetError(BreakerError):
    """Raised when a catch-up exchange with a peer fails (stream, frame or protocol error)."""

    code = "catchup_failed"

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # a short label for statistics: "open: ExcType", "stream: ExcType", "reply"


class CoalescingRpcQueue(RpcQueue):
    """py-libp2p's per-peer outbound RPC queue, but ``pop`` returns every RPC waiting (in
    order, up to COALESCE_BYTES) merged into one.

    py-libp2p writes each queued RPC on its own: one protobuf encode, Noise encryption,
    yamux frame and socket write for each ~250-byte vote, and one read, decryption and
    parse on the other side. While the sending loop keeps up nothing changes; when it falls
    behind (a burst of votes) the RPCs that piled up go out as one, so the per-write cost
    is paid once per batch. The wire format is unchanged: an RPC may carry many messages
    and control entries, and receivers handle each one in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: rpc_pb2.RPC | None = None  # popped, but did not fit the last batch

    def __len__(self) -> int:
        return super().__len__() + (self._held is not None)

    async def pop(self) -> rpc_pb2.RPC | None:
        first, self._held = self._held, None
        if first is None:
            first = await super().pop()
            if first is None:
                return None
        size = first.ByteSize()
        merged: rpc_pb2.RPC | None = None
        while (following := self._queue.pop()) is not None:
            extra = following.ByteSize()
            if size + extra > COALESCE_BYTES:
                self._held = following
                break
            if merged is None:  # an RPC may be queued for several peers: never change it
                merged = rpc_pb2.RPC()
                merged.CopyFrom(first)
            merged.MergeFrom(following)
            size += extra
        return first if merged is None else merged


def _no_peer_record(host: IHost) -> tuple[bytes, bool]:
    """Stands in for py-libp2p's ``env_to_send_in_RPC`` in its routers: PRSM sends no signed
    peer record on their RPCs (LeanPubsub.write_msg strips it), so it is not built either.
    py-libp2p builds it for every message forwarded and every control RPC: ``host.get_addrs()``
    (a getsockname and multiaddr parse per listener) and a comparison with the cached record;
    measured, 10 to 15 % of a node's busy time during a burst of votes. (The hello packet,
    once per peer, is written without write_msg and keeps its record: its receiver drops an
    RPC whose record does not verify.)"""
    return b"", False


def tune_pubsub_module() -> None:
    """Raise py-libp2p's per-peer outbound queue and subscription channel (default 32 each),
    make the queue coalesce (CoalescingRpcQueue), and stop it building signed peer records
    (_no_peer_record)."""
    if getattr(pubsub_module, "_prsm_tuned", False):
        return
    pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = SUBSCRIPTION_CHANNEL
    pubsub_module.RpcQueue = functools.partial(CoalescingRpcQueue, max_size=OUTBOUND_QUEUE)  # type: ignore[attr-defined,assignment]
    for module in (gossipsub_module, floodsub_module):
        module.env_to_send_in_RPC = _no_peer_record  # type: ignore[attr-defined]
    pubsub_module._prsm_tuned = True  # type: ignore[attr-defined]


class ContentIdMessageCache(MessageCache):
    """py-libp2p's gossip message cache, keyed by our message id (``message_id``).

    py-libp2p's cache keys messages by ``from || seqno`` whatever message id the pubsub uses,
    and gossip advertises those keys in IHAVE; a receiver looks them up in its seen cache,
    which holds our ids, never finds them, and asks for every message with IWANT. Measured
    on 20 nodes over 56 votes: 18,166 ids advertised, 18,159 asked for, and 22,765 copies of
    votes sent (406 per vote), most of the CPU the nodes spent while votes moved."""

    def put(self, msg: rpc_pb2.Message) -> None:
        mid = message_id(msg)
        if mid not in self.msgs:
            self.msgs[mid] = msg
            self.history[0].append(CacheEntry(mid, msg.topicIDs))


class FloodPublishGossipSub(GossipSub):
    """GossipSub with flood publishing (gossipsub v1.1, on by default in go-libp2p): a node's
    *own* messages go to every peer subscribed to the topic, not only to its mesh, so a vote
    reaches the voter's direct peers in one hop; relayed messages still follow the mesh.
    Its message cache is keyed by our message ids (ContentIdMessageCache)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mcache = ContentIdMessageCache(self.mcache.window_size, self.mcache.history_size)

    def _get_peers_to_send(
        self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if pubsub is not None and msg_forwarder == origin == pubsub.my_id:
            for topic in topics:
                peers.update(p for p in pubsub.peer_topics.get(topic, ()) if p != origin and p in self.peer_protocol)
        return peers

    def _get_in_topic_gossipsub_peers_from_minus(
        self, topic: str, num_to_select: int, minus: Iterable[ID], backoff_check: bool = False
    ) -> list[ID]:
        """py-libp2p's candidate selection, with BACKOFF_SLACK on the backoff check (used by
        the heartbeat to pick peers to graft)."""
        if backoff_check:
            now = int(time.time())
            backoff = self.back_off.get(topic, {})
            for peer in [p for p, until in backoff.items() if until + BACKOFF_SLACK <= now]:
                del backoff[peer]
            minus = set(minus) | set(backoff)
        return super()._get_in_topic_gossipsub_peers_from_minus(topic, num_to_select, minus, False)

    async def _maintain_mesh_quality(self, topic: str) -> None:
        """No score-driven peer replacement (a py-libp2p addition, not in the gossipsub spec).

        Every heartbeat it swaps the lowest-scoring mesh peer for a better-scoring outsider;
        a peer's score grows with its time in the mesh, so the peer just grafted is the
        worst one at the next heartbeat and some outsider (one pruned a while ago) looks
        better: measured on an idle 20-node devnet, one PRUNE and one GRAFT per node per
        second, forever — CPU on every node and a mesh that never settles. Degree bounds
        (D_low/D_high) and backoffs still maintain the mesh, as the spec has it."""
        await trio.lowlevel.checkpoint()

    def _perform_opportunistic_grafting(self, topic: str, peers_to_graft: defaultdict[ID, list[str]]) -> int:
        """No opportunistic grafting on every heartbeat.

        The spec grafts opportunistically once a minute, and only when the mesh's median
        score falls below a threshold set for an attack; py-libp2p grafts on every
        heartbeat by its own thresholds, pushing meshes over D_high, so the peers at the
        other end prune: the steady GRAFT/PRUNE churn measured on idle devnets (two of each
        per node per second). Our votes are checked by signature and stake, not by score."""
        return 0

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Iterable[str]) -> None:
        """No IDONTWANT (gossipsub v1.2): it saves a mesh peer from sending a large message
        twice, but a vote is ~250 bytes, smaller than the IDONTWANT RPC itself, and each one
        is one more RPC per mesh peer to build, send and handle per vote."""
        await trio.lowlevel.checkpoint()


class LeanPubsub(Pubsub):
    """Pubsub that sends no signed peer record (``senderRecord``) on any RPC.

    py-libp2p attaches this host's signed peer record to every RPC it sends (messages,
    IHAVE/IWANT/GRAFT/PRUNE, subscriptions), and the receiver verifies it (an Ed25519 check)
    for each, duplicates included: measured, the largest CPU cost of a vote burst, and a
    steady cost of every heartbeat. The record only refreshes certified addresses, which PRSM
    does not use (peers come from Kademlia and identify)."""

    def _is_subscribed_to_msg(self, msg: rpc_pb2.Message) -> bool:
        """Asked for each message of an incoming RPC before ``push_msg`` is started for it as
        a new task; ``push_msg`` drops a message already seen as its first check. Here a seen
        copy (most copies: every mesh peer relays each vote) is dropped before that task is
        started: py-libp2p's task manager searches all its tasks for the parent of each new
        one, measured at ~9 % of a well-connected node's busy time in a burst."""
        return super()._is_subscribed_to_msg(msg) and not self._is_msg_seen(msg)

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        if rpc_msg.HasField("senderRecord"):
            stripped = rpc_pb2.RPC()
            stripped.CopyFrom(rpc_msg)
            stripped.ClearField("senderRecord")
            if not stripped.ByteSize():  # the record was all it held
                return True
            rpc_msg = stripped
        return await super().write_msg(stream, rpc_msg)


def message_id(msg: rpc_pb2.Message) -> bytes:
    """The gossipsub message id: SHA-256 of the data, which for a canonical vote is its vote_id,
    so the same vote relayed by several peers (or re-published) is one message."""
    return hashlib.sha256(msg.data).digest()


def build_pubsub(
    host: IHost, *, single_host: bool, heartbeat_interval: int = HEARTBEAT_INTERVAL
) -> tuple[Pubsub, GossipSub]:
    """A Pubsub with a GossipSub router (flood publishing own votes) on ``host``, every limit
    set on purpose.

    Gossip messages are not signed by their origin peer (no strict signing, as Ethereum's
    consensus gossip, ``StrictNoSign``): a vote carries its voter's signature, which the topic
    validator checks before anything is relayed; message ids are hashes of the vote, not of
    origin and sequence number; a bad vote is charged to the peer that forwarded it, known
    from the Noise session. An origin signature would add an Ed25519 check to every node for
    every vote (and a signature to every publish) and prove nothing the vote does not.
    """
    tune_pubsub_module()
    router = FloodPublishGossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=DEGREE,
        degree_low=DEGREE_LOW,
        degree_high=DEGREE_HIGH,
        time_to_live=60,
        gossip_window=3,
        gossip_history=5,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=heartbeat_interval,
        do_px=False,
        prune_back_off=PRUNE_BACKOFF,
        unsubscribe_back_off=10,
        spam_protection_enabled=True,
        max_messages_per_topic_per_second=SPAM_LIMIT_PER_SECOND,
        eclipse_protection_enabled=not single_host,
        min_mesh_diversity_ips=1 if single_host else 3,
        adaptive_gossip_enabled=False,
    )
    # Gossip repair (IHAVE -> IWANT) is how a vote missed in a burst still arrives; py-libp2p
    # throttles it to 10 messages a second per peer by default, below a burst's rate. These
    # are plain attributes, not constructor arguments.
    router.max_iwant_requests_per_second = GOSSIP_REPAIR_PER_SECOND
    router.max_ihave_messages_per_second = GOSSIP_REPAIR_PER_SECOND
    pubsub = LeanPubsub(
        host,
        router,
        cache_size=4096,
        seen_ttl=SEEN_TTL,
        sweep_interval=60,
        strict_signing=False,
        msg_id_constructor=message_id,
        max_concurrent_validator_count=64,
        # The verdict depends on the stake table and tally of the moment (a voter may stake in
        # the next block): never reuse an old verdict. Duplicates are caught by the seen cache.
        validation_cache_ttl=0,
        validation_cache_size=16,
        max_inbound_rpc_size=MAX_INBOUND_RPC,
    )
    return pubsub, router


async def _close(stream: object) -> None:
    with trio.move_on_after(1):
        try:
            await stream.close()  # type: ignore[attr-defined]
        except Exception:  # the peer may be gone; nothing left to close
            pass


@contextlib.asynccontextmanager
async def _catchup_stream(host: IHost, peer: ID, what: str) -> AsyncIterator[INetStream]:
    """A ``/prsm/breaker/1.0.0`` stream to ``peer``, closed afterwards. Any failure on it
    becomes a BreakerNetError naming ``what``; BreakerErrors raised inside (Malformed: the
    peer's fault) pass through unchanged."""
    try:
        with trio.fail_after(STEP_TIMEOUT):
            stream = await host.new_stream(peer, [CATCHUP])
    except Exception as exc:  # py-libp2p raises many types, some grouped
        raise BreakerNetError(f"cannot open {PROTOCOL_ID} to {peer}: {exc!r}", f"open: {type(exc).__name__}") from None
    try:
        yield stream
    except BreakerError:
        raise
    except Exception as exc:  # stream errors of py-libp2p have no common base we can name
        raise BreakerNetError(f"{what} with {peer} failed: {exc!r}", f"stream: {type(exc).__name__}") from None
    finally:
        await _close(stream)


async def _ask(stream: INetStream, request: bytes) -> object:
    """One request and its reply on a catch-up stream, under STEP_TIMEOUT."""
    with trio.fail_after(STEP_TIMEOUT):
        await write_frame(stream, request)
        return decode_message(await read_frame(stream, MAX_REPLY_SIZE))


async def sync_votes(
    host: IHost,
    peer: ID,
    before_ms: int,
    my_digest: Callable[[int], bytes],
    on_page: Callable[[Sequence[Vote]], None],
) -> int:
    """One anti-entropy exchange: ``peer``'s digest of its votes older than ``before_ms``,
    compared with ``my_digest(before_ms)``; then the votes of the buckets that differ,
    handed to ``on_page`` a page at a time as they arrive (what came before an error is
    kept). Returns the number of differing buckets. Errors as fetch_votes."""
    with trio.fail_after(EXCHANGE_LIMIT):
        async with _catchup_stream(host, peer, "anti-entropy") as stream:
            reply = await _ask(stream, encode_message(GetDigest(before_ms)))
            if not isinstance(reply, Digest) or reply.before_ms != before_ms:
                raise BreakerNetError(f"{peer} answered GET_DIGEST with {type(reply).__name__}", "reply")
            differ = differing_buckets(my_digest(before_ms), reply.digest)
            request: GetBuckets | None = GetBuckets(bucket_set(differ), before_ms) if differ else None
            pages = 0
            while request is not None and pages < MAX_SYNC_PAGES:
                votes = await _ask(stream, encode_message(request))
                if not isinstance(votes, Votes):
                    raise BreakerNetError(f"{peer} answered GET_BUCKETS with {type(votes).__name__}", "reply")
                on_page(votes.votes)
                request = next_bucket_request(request, votes)
                pages += 1
    return len(differ)


async def fetch_votes(
    host: IHost, peer: ID, on_page: Callable[[Sequence[Vote]], None], model: bytes = b""
) -> None:
    """Every vote ``peer`` serves (for ``model``, or all), page by page on one stream, each
    page handed to ``on_page`` as it arrives (pages come in catch-up order, so counting them
    one by one is counting them all in that order; what came before an error is kept).

    Raises BreakerNetError on any failure, trio.TooSlowError when a step takes over
    STEP_TIMEOUT or the exchange over EXCHANGE_LIMIT, and Malformed when the peer sent bytes
    that do not decode (its fault)."""
    with trio.fail_after(EXCHANGE_LIMIT):
        async with _catchup_stream(host, peer, "catch-up") as stream:
            request: GetVotes | None = GetVotes(model=model)
            pages = 0
            while request is not None and pages < MAX_CATCHUP_PAGES:
                reply = await _ask(stream, encode_message(request))
                if not isinstance(reply, Votes):
                    raise BreakerNetError(f"{peer} answered GET_VOTES with {reply!r}", "reply")
                on_page(reply.votes)
                request = next_request(request, reply)
                pages += 1

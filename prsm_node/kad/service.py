"""Kademlia discovery on ``/prsm/kad/1.0.0`` (libp2p kad-dht wire format, PRSM protocol id).

The service answers FIND_NODE and PING, runs iterative lookups, dials the bootstrap peers with
backoff until one answers, refreshes stale buckets, and saves known peers so a restarted node
redials them. See protocols/kad.md.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from .._trio import TaskStatus
from ..config import DiscoverySection
from ..exceptions import DiscoveryError
from ..logs import kv
from ..store import Namespace
from ..wire import FrameError, guarded_handler, read_frame, write_frame
from . import messages as m
from .routing import RoutingTable, kad_key, random_key_in_bucket

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/prsm/kad/1.0.0")
SAVE_INTERVAL = 30.0
MAX_REQUESTS_PER_STREAM = 64
# An inbound stream that sends nothing for this long is reset (no slow-loris streams).
INBOUND_IDLE_TIMEOUT = 30.0
# Addresses kept per peer learned from others, and sent per peer in a response.
MAX_ADDRS_PER_PEER = 8
# Addresses learned from other peers' responses expire; confirmed ones are refreshed by identify.
LEARNED_ADDR_TTL = 3600
# Live peers with no known address being asked for their own record, at most.
MAX_VERIFYING = 64
VERIFY_ATTEMPTS = 3
# Iterative lookups find_peer runs before it reports a peer as not found.
FIND_PEER_LOOKUPS = 2
# The first self-lookup refresh comes this long after start; the interval then doubles.
FIRST_REFRESH_AFTER = 10.0
# Consecutive failed requests before a peer leaves the routing table.
EVICT_AFTER_FAILURES = 2


def strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    text = str(addr)
    return multiaddr.Multiaddr(text.split("/p2p/", 1)[0]) if "/p2p/" in text else addr


@dataclass
class LookupResult:
    closest: list[ID]
    queried: int
    found: PeerInfo | None = None


class Kademlia:
    def __init__(
        self,
        host: IHost,
        cfg: DiscoverySection,
        saved: Namespace,
        bootstrap: Iterable[str],
    ) -> None:
        self.host = host
        self.cfg = cfg
        self._saved = saved
        self.local_id = host.get_id()
        self.table = RoutingTable(self.local_id.to_bytes(), cfg.bucket_size)
        self._bootstrap = [a for a in bootstrap if not a.endswith(f"/p2p/{self.local_id}")]
        self._changed = trio.Event()
        self._dirty = False
        self._verifying: set[ID] = set()
        self._failures: dict[ID, int] = {}
        self._self_lookup_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.lookups = 0
        self.requests_served = 0

    # ---- service ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, guarded_handler(PROTOCOL_ID, self._handle_stream))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for info in self._load_saved_peers():
                nursery.start_soon(self._try_saved_peer, info)
            for addr in self._bootstrap:
                nursery.start_soon(self._dial_bootstrap, addr)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._save_loop)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.save_peers()

    # Joining: at start, saved peers get one PING each and every bootstrap peer is dialled with
    # backoff until it answers, each in its own task, so none waits for another. Every peer
    # that answers triggers a self-lookup. A table that empties later triggers _rejoin.

    async def _rejoin(self) -> None:
        """One PING to every saved and bootstrap peer, all at once (bounded by the timeout)."""
        infos = self._load_saved_peers()
        infos += [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in self._bootstrap]
        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(self._try_saved_peer, info)

    async def _try_saved_peer(self, info: PeerInfo) -> None:
        if await self._try_peer(info):
            await self._self_lookup()

    async def _dial_bootstrap(self, addr: str) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        delay = self.cfg.bootstrap_backoff_initial
        attempt = 0
        while True:
            attempt += 1
            if await self._try_peer(info):
                log.info("joined through bootstrap peer", extra=kv(peer=str(info.peer_id), attempt=attempt))
                await self._self_lookup()
                return
            log.info(
                "bootstrap peer unreachable, retrying",
                extra=kv(addr=addr, attempt=attempt, retry_in=round(delay, 2)),
            )
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.bootstrap_backoff_max)

    async def _try_peer(self, info: PeerInfo) -> bool:
        """Connect and PING over kad; on success the peer enters the routing table."""
        try:
            self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 0)
            await self.request(info.peer_id, m.KadMessage(type=m.MessageType.PING))
            return True
        except DiscoveryError:
            return False

    async def _self_lookup(self) -> None:
        """Look up our own id: fills the buckets near us and tells our neighbours we exist.
        One at a time; a lookup already running serves the caller too."""
        if self._self_lookup_lock.locked():
            return
        async with self._self_lookup_lock:
            try:
                await self.lookup(self.local_id.to_bytes())
            except DiscoveryError as exc:
                log.debug("self lookup failed", extra=kv(error=str(exc)))

    async def _refresh_loop(self) -> None:
        """Self-lookups soon after start, then less and less often (a network that is still
        forming keeps changing in its first minutes, and the first self-lookup saw only part
        of it); every ``refresh_interval``, also a lookup in each stale bucket."""
        interval = min(FIRST_REFRESH_AFTER, self.cfg.refresh_interval)
        since_full = 0.0
        while True:
            # Jitter: daemons started together (a devnet) must not refresh in lockstep.
            await trio.sleep(interval * random.uniform(0.75, 1.25))
            since_full += interval
            interval = min(interval * 2, self.cfg.refresh_interval)
            if not len(self.table):
                if self._bootstrap or self._saved_peer_count():
                    log.warning("routing table is empty; dialling bootstrap and saved peers again")
                    await self._rejoin()
                continue  # a node with nobody to dial (a lone dev node) just waits for peers
            await self._self_lookup()
            if since_full >= self.cfg.refresh_interval:
                since_full = 0.0
                await self._refresh_stale_buckets()

    async def _refresh_stale_buckets(self) -> None:
        now = trio.current_time()
        for index in self.table.stale_buckets(now, self.cfg.refresh_interval):
            key = await trio.to_thread.run_sync(random_key_in_bucket, self.table.local_key, index)
            if key is not None:
                try:
                    await self.lookup(key)
                except DiscoveryError:
                    pass

    async def _save_loop(self) -> None:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            if self._dirty:
                self.save_peers()

    # ---- peers ------------------------------------------------------------------------

    def _advertises_kad(self, peer_id: ID) -> bool:
        try:
            return PROTOCOL_ID in self.host.get_peerstore().get_protocols(peer_id)
        except Exception:  # PeerStoreError: identify has not run yet
            return False

    def _seen(self, peer_id: ID, *, serves_kad: bool = True) -> None:
        """A peer proved alive. It enters the table only if it serves kad and has an address
        others can dial; otherwise (identify still running, or a client) it is asked for its
        own record in the background, and a server's answer admits it."""
        if not serves_kad or not self.addrs_of(peer_id):
            if peer_id not in self._verifying and len(self._verifying) < MAX_VERIFYING and self._nursery:
                self._verifying.add(peer_id)
                self._nursery.start_soon(self._verify, peer_id)
            return
        self._failures.pop(peer_id, None)
        before = self.table.version
        self.table.seen(peer_id.to_bytes(), trio.current_time())
        if self.table.version != before:
            self._dirty = True
            self._changed.set()
            self._changed = trio.Event()

    async def _verify(self, peer_id: ID) -> None:
        """Admit a live peer once it answers for itself; a few tries, since a node under load
        can miss one timeout, and a peer left out here is invisible to lookups until the next
        refresh."""
        try:
            delay = self.cfg.bootstrap_backoff_initial
            for _ in range(VERIFY_ATTEMPTS):
                if await self._ask_peer_itself(peer_id) or peer_id not in self.host.get_network().connections:
                    return
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay *= 2
        finally:
            self._verifying.discard(peer_id)

    def _failed(self, peer_id: ID) -> None:
        """A request failed. Evict only after consecutive failures: one timeout on a loaded
        machine says little, and an evicted neighbour drops out of everyone's lookups."""
        if peer_id.to_bytes() not in self.table:
            self.table.failed(peer_id.to_bytes())  # drops it from the replacement list, if there
            return
        count = self._failures.get(peer_id, 0) + 1
        if count < EVICT_AFTER_FAILURES:
            self._failures[peer_id] = count
            return
        self._failures.pop(peer_id, None)
        before = self.table.version
        self.table.failed(peer_id.to_bytes())
        if self.table.version != before:
            self._dirty = True
            self._changed.set()
            self._changed = trio.Event()

    async def wait_table_size(self, size: int) -> None:
        """Return once the routing table holds at least ``size`` peers."""
        while len(self.table) < size:
            await self._changed.wait()

    def addrs_of(self, peer_id: ID) -> list[multiaddr.Multiaddr]:
        try:
            addrs = self.host.get_peerstore().addrs(peer_id)
        except Exception:  # PeerStoreError: unknown or expired peer
            return []
        unique: dict[str, multiaddr.Multiaddr] = {}
        for a in addrs:
            bare = strip_p2p(a)
            unique.setdefault(str(bare), bare)
        return list(unique.values())

    def _kad_peer(self, peer_id: ID) -> m.KadPeer:
        connected = peer_id in self.host.get_network().connections
        return m.KadPeer(
            id=peer_id.to_bytes(),
            addrs=tuple(a.to_bytes() for a in self.addrs_of(peer_id)[:MAX_ADDRS_PER_PEER]),
            connection=m.ConnectionType.CONNECTED if connected else m.ConnectionType.NOT_CONNECTED,
        )

    def _saved_peer_count(self) -> int:
        return sum(1 for _ in self._saved.items())

    def _load_saved_peers(self) -> list[PeerInfo]:
        infos = []
        for key, value in self._saved.items():
            try:
                record = msgpack.unpackb(value)
                addrs = [multiaddr.Multiaddr(a) for a in record["addrs"]]
                infos.append(PeerInfo(ID(key), addrs))
            except Exception as exc:  # a damaged record must not stop the node
                log.warning("skipping unreadable saved peer", extra=kv(error=repr(exc)))
        return infos

    def save_peers(self) -> None:
        """Save the routing table's peers for the next start. An empty table saves nothing:
        the last good set is exactly what a node cut off from everyone needs to rejoin."""
        records: dict[bytes, bytes] = {}
        for raw in self.table.peers():
            addrs = self.addrs_of(ID(raw))
            if addrs:
                records[raw] = msgpack.packb({"addrs": [str(a) for a in addrs[:MAX_ADDRS_PER_PEER]]})
            if len(records) >= self.cfg.max_saved_peers:
                break
        if not records:
            return
        self._saved.replace_all(records, sync=True)
        self._dirty = False

    # ---- wire -------------------------------------------------------------------------

    async def _handle_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        for _ in range(MAX_REQUESTS_PER_STREAM):
            try:
                with trio.fail_after(INBOUND_IDLE_TIMEOUT):
                    body = await read_frame(stream, m.MAX_MESSAGE_SIZE)
            except StreamEOF:
                return
            try:
                request = m.decode(body)
            except m.KadDecodeError as exc:
                log.info("malformed kad request", extra=kv(peer=str(peer_id), error=str(exc)))
                raise FrameError(f"malformed kad message: {exc}") from None
            response = self._respond(peer_id, request)
            if response is None:
                log.debug("unsupported kad request", extra=kv(peer=str(peer_id), type=request.type.name))
                await stream.reset()
                return
            await write_frame(stream, m.encode(response))
            self.requests_served += 1
            # A requester may be a client that serves no kad itself: it enters the table only
            # once identify lists /prsm/kad/1.0.0, or it answers a kad request of ours.
            self._seen(peer_id, serves_kad=self._advertises_kad(peer_id))

    def _respond(self, requester: ID, request: m.KadMessage) -> m.KadMessage | None:
        if request.type == m.MessageType.PING:
            return m.KadMessage(type=m.MessageType.PING)
        if request.type == m.MessageType.FIND_NODE:
            count = min(self.cfg.bucket_size, m.MAX_CLOSER_PEERS - 1)  # room for our own entry
            closest = self.table.closest(kad_key(request.key), count, exclude=requester.to_bytes())
            peers = [self._kad_peer(ID(raw)) for raw in closest]
            target = _peer_id_or_none(request.key)
            if target == self.local_id:
                peers.insert(0, self._kad_peer_self())
            return m.KadMessage(
                type=m.MessageType.FIND_NODE,
                key=request.key,
                closer_peers=tuple(p for p in peers if p.addrs),
            )
        return None  # provider and value records arrive with the shard exchange

    def _kad_peer_self(self) -> m.KadPeer:
        addrs = tuple(strip_p2p(a).to_bytes() for a in self.host.get_addrs()[:MAX_ADDRS_PER_PEER])
        return m.KadPeer(id=self.local_id.to_bytes(), addrs=addrs, connection=m.ConnectionType.CONNECTED)

    async def request(self, peer_id: ID, msg: m.KadMessage) -> m.KadMessage:
        """One request/response on a fresh stream; a failure evicts the peer from the table."""
        try:
            with trio.fail_after(self.cfg.request_timeout):
                stream = await self.host.new_stream(peer_id, [PROTOCOL_ID])
                try:
                    await write_frame(stream, m.encode(msg))
                    response = m.decode(await read_frame(stream, m.MAX_MESSAGE_SIZE))
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except Exception as exc:  # timeouts, dial failures, resets, bad frames alike
            if isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
            self._failed(peer_id)
            raise DiscoveryError(f"{peer_id}: {type(exc).__name__}: {exc}") from None
        if response.type != msg.type:
            self._failed(peer_id)
            raise DiscoveryError(f"{peer_id}: answered {response.type.name} to {msg.type.name}")
        self._seen(peer_id)
        return response

    # ---- lookups ----------------------------------------------------------------------

    async def lookup(self, key: bytes, *, target: ID | None = None) -> LookupResult:
        """Iterative FIND_NODE: query the alpha closest unqueried peers until the k closest
        known peers have all answered (or failed). Stops early when ``target`` is reached."""
        self.lookups += 1
        goal = kad_key(key)
        k = self.cfg.bucket_size
        candidates: dict[bytes, int] = {raw: kad_key(raw) for raw in self.table.closest(goal, k)}
        queried: set[bytes] = set()
        answered: set[bytes] = set()
        result = LookupResult(closest=[], queried=0)
        if not candidates:
            raise DiscoveryError("the routing table is empty: no peer to ask")

        async def ask(raw: bytes) -> None:
            peer_id = ID(raw)
            try:
                response = await self.request(peer_id, m.KadMessage(type=m.MessageType.FIND_NODE, key=key))
            except DiscoveryError:
                return
            answered.add(raw)
            for peer in response.closer_peers:
                learned = self._learn(peer)
                if learned is None:
                    continue
                candidates.setdefault(peer.id, kad_key(peer.id))
                if target is not None and learned.peer_id == target and result.found is None:
                    result.found = learned

        while result.found is None:
            nearest = sorted(candidates, key=lambda raw: candidates[raw] ^ goal)[:k]
            batch = [raw for raw in nearest if raw not in queried][: self.cfg.alpha]
            if not batch:
                break
            queried.update(batch)
            async with trio.open_nursery() as nursery:
                for raw in batch:
                    nursery.start_soon(ask, raw)
        result.queried = len(queried)
        result.closest = [ID(raw) for raw in sorted(answered, key=lambda r: candidates[r] ^ goal)[:k]]
        return result

    async def lookup_peer(self, peer_id: ID) -> LookupResult:
        """Iterative lookups for one peer, up to FIND_PEER_LOOKUPS: the second starts from the
        peers the first one met, since a node that joined while the network was forming may
        not yet be in every neighbour's table. Raises DiscoveryError if none finds it."""
        asked = 0
        for _ in range(FIND_PEER_LOOKUPS):
            result = await self.lookup(peer_id.to_bytes(), target=peer_id)
            asked += result.queried
            if result.found is not None:
                result.queried = asked
                return result
        raise DiscoveryError(f"peer {peer_id} not found ({asked} peers asked)")

    def _learn(self, peer: m.KadPeer) -> PeerInfo | None:
        """Record a peer named in a response; its addresses go to the peerstore."""
        if peer.id == self.local_id.to_bytes():
            return None
        try:
            peer_id = ID(peer.id)
            addrs = [multiaddr.Multiaddr(a) for a in peer.addrs[:MAX_ADDRS_PER_PEER]]
        except Exception:  # a bad id or address from a peer is its problem, not ours
            return None
        if not addrs:
            return None
        self.host.get_peerstore().add_addrs(peer_id, addrs, LEARNED_ADDR_TTL)
        return PeerInfo(peer_id, addrs)

    async def find_peer(self, peer_id: ID) -> PeerInfo:
        """Resolve a peer to its addresses and prove them by connecting."""
        if peer_id == self.local_id:
            return PeerInfo(peer_id, [strip_p2p(a) for a in self.host.get_addrs()])
        if peer_id in self.host.get_network().connections:
            if self.addrs_of(peer_id) or await self._ask_peer_itself(peer_id):
                return PeerInfo(peer_id, self.addrs_of(peer_id))
        elif self.addrs_of(peer_id) and await self._connect(peer_id):
            return PeerInfo(peer_id, self.addrs_of(peer_id))
        found = (await self.lookup_peer(peer_id)).found
        assert found is not None
        if peer_id not in self.host.get_network().connections and not await self._connect(peer_id):
            shown = ", ".join(str(a) for a in found.addrs)
            raise DiscoveryError(f"peer {peer_id} found at {shown} but not reachable")
        return PeerInfo(peer_id, self.addrs_of(peer_id) or found.addrs)

    async def _ask_peer_itself(self, peer_id: ID) -> bool:
        """Learn a connected peer's listen addresses from the peer: FIND_NODE for its own id
        returns its own record. Needed when identify has not filled the peerstore yet."""
        try:
            response = await self.request(peer_id, m.KadMessage(type=m.MessageType.FIND_NODE, key=peer_id.to_bytes()))
        except DiscoveryError:
            return False
        for peer in response.closer_peers:
            self._learn(peer)
        if not self.addrs_of(peer_id):
            return False
        self._seen(peer_id)
        return True

    async def _connect(self, peer_id: ID) -> bool:
        try:
            with trio.fail_after(self.cfg.request_timeout):
                await self.host.connect(PeerInfo(peer_id, self.addrs_of(peer_id)))
            return True
        except Exception as exc:  # dial errors come in many types, some as groups
            log.debug("dial failed", extra=kv(peer=str(peer_id), error=repr(exc)))
            return False

    def statistics(self) -> dict[str, int]:
        return {
            "routing_table_size": len(self.table),
            "lookups": self.lookups,
            "requests_served": self.requests_served,
        }


def _peer_id_or_none(raw: bytes) -> ID | None:
    try:
        return ID(raw)
    except Exception:
        return None

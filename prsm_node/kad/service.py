"""Kademlia discovery on ``/prsm/kad/1.0.0`` (libp2p kad-dht wire format, PRSM protocol id).

The service answers FIND_NODE and PING, runs iterative lookups, dials the bootstrap peers with
backoff until one answers, refreshes stale buckets, and saves known peers so a restarted node
redials them. It also keeps provider records (ADD_PROVIDER / GET_PROVIDERS: who serves a content
key) and validated values (PUT_VALUE / GET_VALUE, per registered namespace); the stores are in
providers.py and values.py. See protocols/kad.md.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
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
from .providers import (
    MAX_PROVIDER_ADDRS,
    MAX_PROVIDER_KEY_LEN,
    PROVIDER_REPUBLISH_INTERVAL,
    ProviderStore,
    WriteLimiter,
)
from .routing import RoutingTable, kad_key, random_key_in_bucket
from .values import InvalidRecord, Select, Validate, Validators, ValueNotFound, ValueStore, namespace_of

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
# Expired provider records and values are swept this often (reads also skip expired ones).
EXPIRE_INTERVAL = 60.0
# Addresses remembered without their /p2p/ part (addrs_of), at most; then forgotten at once.
MAX_BARE_ADDRS = 4096


class RecordRefused(Exception):
    """Raised when an ADD_PROVIDER or PUT_VALUE request is refused: the stream is reset.
    ``forged`` marks a request no honest peer sends (a provider record for another peer)."""

    def __init__(self, reason: str, *, forged: bool = False) -> None:
        super().__init__(reason)
        self.forged = forged


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
        self.providers = ProviderStore()
        self.values = ValueStore()
        self.validators = Validators()
        self._write_limiter = WriteLimiter()
        self._providing: dict[bytes, None] = {}  # our own provider records, in announce order
        self._unannounced: set[bytes] = set()  # provided while no peer accepted them
        self._own_values: dict[bytes, bytes] = {}
        self._bare_addrs: dict[bytes, multiaddr.Multiaddr] = {}
        # Tests shorten this; config.toml [discovery] does not carry it yet.
        self.republish_interval = PROVIDER_REPUBLISH_INTERVAL
        self.provides = 0
        self.provider_lookups = 0
        self.value_lookups = 0
        self.records_refused = 0
        self.invalid_values_received = 0

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
            nursery.start_soon(self._republish_loop)
            nursery.start_soon(self._expire_loop)
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
                return
        if self._unannounced and self._nursery is not None:
            # Keys provided while we knew nobody: announce them now that we know somebody.
            pending, self._unannounced = self._unannounced, set()
            for key in pending:
                self._nursery.start_soon(self._announce, key)

    async def _refresh_loop(self) -> None:
        """Self-lookups soon after start, then less and less often (a network that is still
        forming keeps changing in its first minutes, and the first self-lookup saw only part
        of it); every ``refresh_interval``, also a lookup in each stale bucket.

        The early self-lookups stop as soon as one finds the table as the last one left it
        (no peer came or went meanwhile, by their requests or by this lookup): the network
        around this node has formed, and a node that joins later makes itself known by its
        own self-lookup. Measured on idle 30-node devnets, these lookups (k requests each, a
        new stream per request) were most of an ordinary node's CPU a minute after start."""
        interval = min(FIRST_REFRESH_AFTER, self.cfg.refresh_interval)
        since_full = 0.0
        version = self.table.version
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
            if self.table.version == version:
                interval = self.cfg.refresh_interval  # stable: no more early refreshes
            version = self.table.version
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

    async def _republish_loop(self) -> None:
        """Announce our provider records and put our values again before they expire elsewhere."""
        while True:
            await trio.sleep(self.republish_interval)
            await self.republish()

    async def republish(self) -> None:
        """Announce every record we provide and put every value we put, once more."""
        for key in list(self._providing):
            await self._announce(key)
        for key, value in list(self._own_values.items()):
            await self._put_remote(key, value)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRE_INTERVAL)
            self.providers.expire()
            self.values.expire()

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
        unique: dict[bytes, multiaddr.Multiaddr] = {}
        for a in addrs:
            bare = self._bare(a)
            unique.setdefault(bare.to_bytes(), bare)
        return list(unique.values())

    def _bare(self, addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
        """``strip_p2p(addr)``, remembered by the address's bytes: every FIND_NODE answer
        lists k peers' addresses, and stripping one goes through its text form (~10 µs)."""
        raw = addr.to_bytes()
        bare = self._bare_addrs.get(raw)
        if bare is None:
            if len(self._bare_addrs) >= MAX_BARE_ADDRS:
                self._bare_addrs.clear()
            bare = self._bare_addrs[raw] = strip_p2p(addr)
        return bare

    def _kad_peer(self, peer_id: ID, addrs: list[multiaddr.Multiaddr] | None = None) -> m.KadPeer:
        connected = peer_id in self.host.get_network().connections
        addrs = self.addrs_of(peer_id) if addrs is None else addrs
        return m.KadPeer(
            id=peer_id.to_bytes(),
            addrs=tuple(a.to_bytes() for a in addrs[:MAX_ADDRS_PER_PEER]),
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
            try:
                response = self._respond(peer_id, request)
            except RecordRefused as exc:
                self.records_refused += 1
                log.info(
                    "kad request refused",
                    extra=kv(peer=str(peer_id), type=request.type.name, reason=str(exc)),
                )
                if exc.forged:
                    self._failed(peer_id)
                await stream.reset()
                return
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
        """The response to one request; RecordRefused if a record in it is refused."""
        mtype = request.type
        if mtype == m.MessageType.PING:
            return m.KadMessage(type=m.MessageType.PING)
        if mtype == m.MessageType.FIND_NODE:
            peers = self._closer_peers(requester, request.key)
            if _peer_id_or_none(request.key) == self.local_id:
                peers[:0] = [me for me in (self._kad_peer_self(),) if me.addrs]
            return m.KadMessage(type=mtype, key=request.key, closer_peers=tuple(peers))
        if mtype == m.MessageType.ADD_PROVIDER:
            self._accept_provider(requester, request)
            return m.KadMessage(type=mtype, key=request.key)  # an echo confirms the record was stored
        if mtype == m.MessageType.GET_PROVIDERS:
            if not 0 < len(request.key) <= MAX_PROVIDER_KEY_LEN:
                raise RecordRefused(f"provider key of {len(request.key)} bytes")
            providers = [self._kad_peer(i.peer_id, i.addrs) for i in self.local_providers(request.key) if i.addrs]
            return m.KadMessage(
                type=mtype,
                key=request.key,
                closer_peers=tuple(self._closer_peers(requester, request.key)),
                provider_peers=tuple(providers[: m.MAX_PROVIDER_PEERS]),
            )
        if mtype == m.MessageType.PUT_VALUE:
            self._accept_value(requester, request)
            return request  # an echo confirms the value was stored
        if mtype == m.MessageType.GET_VALUE:
            try:  # a key outside any namespace can hold no value: the request is malformed
                namespace_of(request.key)
            except InvalidRecord as exc:
                raise RecordRefused(str(exc)) from None
            value = self.values.get(request.key)
            return m.KadMessage(
                type=mtype,
                key=request.key,
                record=None if value is None else m.Record(key=request.key, value=value),
                closer_peers=tuple(self._closer_peers(requester, request.key)),
            )
        return None

    def _closer_peers(self, requester: ID, key: bytes) -> list[m.KadPeer]:
        """The table's min(k, 63) peers closest to ``key`` (room for our own entry), without the
        requester, nearest first; peers with no known address are left out."""
        count = min(self.cfg.bucket_size, m.MAX_CLOSER_PEERS - 1)
        closest = self.table.closest(kad_key(key), count, exclude=requester.to_bytes())
        peers = [self._kad_peer(ID(raw)) for raw in closest]
        return [p for p in peers if p.addrs]

    def _accept_provider(self, requester: ID, request: m.KadMessage) -> None:
        """Store the requester as a provider of the key, or raise RecordRefused. A peer may
        only announce itself: a record naming anyone else is refused as forged."""
        key = request.key
        if not 0 < len(key) <= MAX_PROVIDER_KEY_LEN:
            raise RecordRefused(f"provider key of {len(key)} bytes")
        if not request.provider_peers:
            raise RecordRefused("no provider record")
        if any(p.id != requester.to_bytes() for p in request.provider_peers):
            raise RecordRefused("provider record for another peer", forged=True)
        if not self._write_limiter.allow(requester.to_bytes()):
            raise RecordRefused("too many records, too fast")
        addrs = _parse_addrs(a for p in request.provider_peers for a in p.addrs) or self.addrs_of(requester)
        if not addrs:
            raise RecordRefused("no address to reach the provider")
        self.providers.add(key, requester.to_bytes(), tuple(a.to_bytes() for a in addrs[:MAX_PROVIDER_ADDRS]))

    def _accept_value(self, requester: ID, request: m.KadMessage) -> None:
        """Store a value that its namespace's validator accepts and that is at least as good
        as the one stored (by the namespace's select), or raise RecordRefused."""
        record = request.record
        if record is None or record.key != request.key:
            raise RecordRefused("PUT_VALUE without a record for its key")
        if not self._write_limiter.allow(requester.to_bytes()):
            raise RecordRefused("too many records, too fast")
        try:
            self.validators.check(request.key, record.value)
            stored = self.values.get(request.key)
            if stored is not None and stored != record.value:
                if self.validators.best(request.key, [record.value, stored]) != 0:
                    raise RecordRefused("the stored value is better")
        except InvalidRecord as exc:
            raise RecordRefused(str(exc)) from None
        self.values.put(request.key, record.value)

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
        # It answered a kad request: it serves kad, whatever identify said (or failed to say).
        # Without this, two peers whose identify exchange failed verify each other forever:
        # each request one serves starts a verification of the requester, whose request the
        # other serves... (measured: two nodes of a 50-node devnet at ~30 streams/s and half
        # a core each, for as long as they ran).
        self._mark_serves_kad(peer_id)
        self._seen(peer_id)
        return response

    def _mark_serves_kad(self, peer_id: ID) -> None:
        if not self._advertises_kad(peer_id):
            try:
                self.host.get_peerstore().add_protocols(peer_id, [PROTOCOL_ID])
            except Exception:  # PeerStoreError: the peer is gone from the peerstore
                pass

    # ---- lookups ----------------------------------------------------------------------

    async def lookup(self, key: bytes, *, target: ID | None = None) -> LookupResult:
        """Iterative FIND_NODE: query the alpha closest unqueried peers until the k closest
        known peers have all answered (or failed). Stops early when ``target`` is reached."""
        return await self._walk(key, m.MessageType.FIND_NODE, target=target)

    async def _walk(
        self,
        key: bytes,
        mtype: m.MessageType,
        *,
        target: ID | None = None,
        on_response: Callable[[ID, m.KadMessage], None] | None = None,
        done: Callable[[], bool] = lambda: False,
    ) -> LookupResult:
        """The iterative lookup behind FIND_NODE, GET_PROVIDERS and GET_VALUE: every answer's
        closer peers become candidates, ``on_response`` sees each answer, and the walk stops
        when the k closest candidates are all queried, ``target`` is found or ``done()``."""
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
                response = await self.request(peer_id, m.KadMessage(type=mtype, key=key))
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
            if on_response is not None:
                on_response(peer_id, response)

        while result.found is None and not done():
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

    # ---- provider records -------------------------------------------------------------

    async def provide(self, key: bytes) -> int:
        """Announce that we serve ``key``: store our own record, then send ADD_PROVIDER to the
        k closest peers an iterative lookup of the key finds. Returns how many accepted it.
        The record is announced again every ``republish_interval`` until stop_providing, and
        at the next self-lookup if no peer accepted it now."""
        if not 0 < len(key) <= MAX_PROVIDER_KEY_LEN:
            raise ValueError(f"provider key must be 1 to {MAX_PROVIDER_KEY_LEN} bytes")
        self._providing[key] = None
        return await self._announce(key)

    def stop_providing(self, key: bytes) -> None:
        """Drop our own record of ``key`` and stop announcing it; remote copies expire."""
        self._providing.pop(key, None)
        self._unannounced.discard(key)

    def local_providers(self, key: bytes) -> list[PeerInfo]:
        """Providers of ``key`` known here, without asking anyone: ourselves first if we
        provide it, then stored records, most recently announced first."""
        infos: list[PeerInfo] = []
        if key in self._providing:
            infos.append(PeerInfo(self.local_id, [strip_p2p(a) for a in self.host.get_addrs()]))
        for record in self.providers.get(key):
            if record.peer_id != self.local_id.to_bytes():
                infos.append(PeerInfo(ID(record.peer_id), _parse_addrs(record.addrs)))
        return infos

    async def find_providers(self, key: bytes, count: int = 20) -> list[PeerInfo]:
        """Up to ``count`` distinct providers of ``key``: local records first, then an iterative
        GET_PROVIDERS lookup that stops once ``count`` are known. Their addresses go to the
        peerstore. A provider named by several peers is listed once, with all its addresses."""
        self.provider_lookups += 1
        found: dict[ID, list[multiaddr.Multiaddr]] = {}

        def add(peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> None:
            known = found.setdefault(peer_id, [])
            known += [a for a in addrs if a not in known][: MAX_ADDRS_PER_PEER - len(known)]

        for info in self.local_providers(key):
            add(info.peer_id, info.addrs)

        def on_response(_: ID, response: m.KadMessage) -> None:
            for peer in response.provider_peers:
                peer_id = _peer_id_or_none(peer.id)
                if peer_id is None or peer_id == self.local_id:
                    continue
                addrs = _parse_addrs(peer.addrs)
                if addrs:
                    self.host.get_peerstore().add_addrs(peer_id, addrs, LEARNED_ADDR_TTL)
                addrs = addrs or self.addrs_of(peer_id)
                if addrs and (peer_id in found or len(found) < count):
                    add(peer_id, addrs)

        if len(found) < count:
            try:
                await self._walk(
                    key, m.MessageType.GET_PROVIDERS, on_response=on_response, done=lambda: len(found) >= count
                )
            except DiscoveryError as exc:  # an empty routing table: the local records are all
                log.debug("provider lookup failed", extra=kv(error=str(exc)))
        return [PeerInfo(peer_id, addrs) for peer_id, addrs in list(found.items())[:count]]

    async def _announce(self, key: bytes) -> int:
        if key not in self._providing:
            return 0
        self.provides += 1
        request = m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=key, provider_peers=(self._kad_peer_self(),))
        accepted = await self._send_to_closest(key, request)
        if not accepted and key in self._providing:
            self._unannounced.add(key)
        return accepted

    async def _send_to_closest(self, key: bytes, request: m.KadMessage) -> int:
        """Send ``request`` to the k closest peers of ``key`` at once; how many echoed it."""
        try:
            closest = (await self.lookup(key)).closest
        except DiscoveryError as exc:
            log.debug("no peers to store a record on", extra=kv(error=str(exc)))
            return 0
        accepted = 0

        async def send(peer_id: ID) -> None:
            nonlocal accepted
            try:
                await self.request(peer_id, request)
                accepted += 1
            except DiscoveryError as exc:
                log.debug("record not stored", extra=kv(peer=str(peer_id), error=str(exc)))

        async with trio.open_nursery() as nursery:
            for peer_id in closest:
                nursery.start_soon(send, peer_id)
        return accepted

    # ---- values -----------------------------------------------------------------------

    def register_namespace(self, prefix: bytes, validate: Validate, select: Select) -> None:
        """Accept, store and serve values whose key starts with ``prefix`` (``/name/``).
        ``validate(key, value)`` raises on a bad value; ``select(key, values)`` returns the
        index of the best. Values of unregistered namespaces are refused."""
        self.validators.register(prefix, validate, select)

    async def put_value(self, key: bytes, value: bytes) -> int:
        """Store ``value`` here and on the k closest peers of ``key``; returns how many peers
        accepted it. InvalidRecord if our own validator refuses it. Put again every
        ``republish_interval`` while this node runs."""
        self.validators.check(key, value)
        self.values.put(key, value)
        self._own_values[key] = value
        return await self._put_remote(key, value)

    async def _put_remote(self, key: bytes, value: bytes) -> int:
        request = m.KadMessage(type=m.MessageType.PUT_VALUE, key=key, record=m.Record(key=key, value=value))
        return await self._send_to_closest(key, request)

    async def get_value(self, key: bytes, quorum: int = 1) -> bytes:
        """The best valid value of ``key``: an iterative GET_VALUE that stops once ``quorum``
        peers returned a valid value (or the k closest were asked), plus our own copy; the
        namespace's select picks the best. Peers that returned an older value are sent the
        best one. ValueNotFound if nobody has a valid value."""
        self.validators.check_key(key)
        self.value_lookups += 1
        got: dict[ID, bytes] = {}

        def on_response(peer_id: ID, response: m.KadMessage) -> None:
            record = response.record
            if record is None or not record.value:
                return
            try:
                if record.key not in (b"", key):
                    raise InvalidRecord("record for another key")
                self.validators.check(key, record.value)
            except InvalidRecord as exc:
                self.invalid_values_received += 1
                log.info("invalid value received", extra=kv(peer=str(peer_id), error=str(exc)))
                return
            got[peer_id] = record.value

        try:
            await self._walk(key, m.MessageType.GET_VALUE, on_response=on_response, done=lambda: len(got) >= quorum)
        except DiscoveryError as exc:
            log.debug("value lookup failed", extra=kv(error=str(exc)))
        local = self.values.get(key)
        values = list(got.values()) + ([local] if local is not None else [])
        if not values:
            raise ValueNotFound(f"no value for {key!r}")
        best = values[self.validators.best(key, values)]
        outdated = [peer_id for peer_id, value in got.items() if value != best]
        if outdated and self._nursery is not None:
            self._nursery.start_soon(self._correct, key, best, outdated)
        if local is not None and local != best:
            self.values.put(key, best)
        return best

    async def _correct(self, key: bytes, value: bytes, peers: list[ID]) -> None:
        request = m.KadMessage(type=m.MessageType.PUT_VALUE, key=key, record=m.Record(key=key, value=value))
        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                nursery.start_soon(self._request_quietly, peer_id, request)

    async def _request_quietly(self, peer_id: ID, request: m.KadMessage) -> None:
        try:
            await self.request(peer_id, request)
        except DiscoveryError:
            pass

    def statistics(self) -> dict[str, int]:
        return {
            "routing_table_size": len(self.table),
            "lookups": self.lookups,
            "requests_served": self.requests_served,
            "provider_keys": self.providers.key_count(),
            "provider_records": len(self.providers),
            "providing": len(self._providing),
            "provides": self.provides,
            "provider_lookups": self.provider_lookups,
            "values_stored": len(self.values),
            "value_bytes": self.values.size_bytes,
            "value_lookups": self.value_lookups,
            "records_refused": self.records_refused,
            "invalid_values_received": self.invalid_values_received,
        }


def _parse_addrs(raw: Iterable[bytes]) -> list[multiaddr.Multiaddr]:
    """Valid binary multiaddrs, /p2p/ stripped and deduplicated, at most MAX_ADDRS_PER_PEER."""
    unique: dict[bytes, multiaddr.Multiaddr] = {}
    for data in raw:
        try:
            addr = strip_p2p(multiaddr.Multiaddr(data))
        except Exception:  # a bad address from a peer is its problem, not ours
            continue
        unique.setdefault(addr.to_bytes(), addr)
        if len(unique) >= MAX_ADDRS_PER_PEER:
            break
    return list(unique.values())


def _peer_id_or_none(raw: bytes) -> ID | None:
    try:
        return ID(raw)
    except Exception:
        return None

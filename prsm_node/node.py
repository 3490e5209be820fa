"""The daemon: one root nursery that starts every service in dependency order.

store → host → discovery → chain (ledger, mempool, tx + sync protocols) → shards (model exchange)
→ control (→ metrics).
Teardown runs in reverse, storage last: each service lives inside the context of the ones it needs.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID

from . import __version__
from ._trio import TaskStatus
from .agents.service import AgentService
from .breaker.control import BreakerMethods
from .breaker.service import BreakerService
from .chain.control import LedgerMethods
from .chain.net import ChainNet
from .chain.service import ChainService
from .config import Config
from .consensus.service import ConsensusService
from .control.server import AfterReply, ControlServer, RequestError, param
from .exceptions import DiscoveryError, ListenError
from .exchange import ModelMethods, ShardService
from .exchange.fetch import FetchParams
from .exchange.ipfs import ipfs_from_config
from .genesis import Genesis
from .home import Home
from .host import build_host, listen_addrs
from .kad.service import Kademlia, strip_p2p
from .keys import NodeKey
from .logs import kv
from .metrics import MetricsServer
from .shards import ShardStore
from .store import Store
from .wire import TRAFFIC

log = logging.getLogger(__name__)

STALL_CHECK_INTERVAL = 0.5  # 10 wake-ups a second cost ~5% of an idle node's CPU
STALL_WARN_AFTER = 0.1
MAX_WAIT_SECONDS = 600.0


def parse_peer_id(text: str) -> ID:
    """A base58 peer id whose bytes are a well-formed multihash, or ``invalid_params``."""
    try:
        peer_id = ID.from_base58(text)
        raw = peer_id.to_bytes()
        code, length = raw[0], raw[1]
        if length != len(raw) - 2 or not ((code == 0x00 and 0 < length <= 42) or (code == 0x12 and length == 32)):
            raise ValueError("not an identity or sha2-256 multihash")
    except Exception:
        raise RequestError("invalid_params", f"not a peer id: {text!r}") from None
    return peer_id


@dataclass
class Ready:
    """What ``Node.run`` hands back once every service is up."""

    peer_id: str
    addrs: list[str]
    control_socket: str

    def line(self) -> str:
        return f"prsm-node ready peer_id={self.peer_id} listen={','.join(self.addrs)} control={self.control_socket}"


class Node:
    def __init__(self, home: Home, cfg: Config, key: NodeKey, genesis: Genesis, bootstrap: list[str]) -> None:
        self.home = home
        self.cfg = cfg
        self.key = key
        self.genesis = genesis
        self.bootstrap = bootstrap
        self.started_at = time.time()
        self.store = Store(home.data_dir / "db")
        self.host = build_host(key, cfg)
        self.kad: Kademlia | None = None
        self.chain: ChainService | None = None
        self.chain_net: ChainNet | None = None
        self.consensus: ConsensusService | None = None
        self.test_fault: str | None = None  # `start --test-fault`: a validator misbehaving on purpose
        self.shards: ShardService | None = None
        self.breaker: BreakerService | None = None
        self.agents: AgentService | None = None
        self.control = ControlServer(home.control_socket, cfg.control.max_request_bytes,
                                     max_connections=cfg.control.max_connections)
        self.metrics: MetricsServer | None = None
        self._cancel = trio.CancelScope()
        self.stop_reason: str | None = None
        self.stopping = trio.Event()

    def stop(self, reason: str) -> None:
        """Ask the node to shut down gracefully (signal handler, control ``stop``)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stopping", extra=kv(reason=reason))
        self.stopping.set()
        self._cancel.cancel()

    async def run(self, *, task_status: TaskStatus[Ready] = trio.TASK_STATUS_IGNORED) -> None:
        self.home.check_socket_path()
        with self._cancel:
            self.store.open()
            try:
                async with self.host.run([multiaddr.Multiaddr(a) for a in self.cfg.p2p.listen]):
                    self._check_listening()
                    try:
                        await self._run_services(task_status)
                    finally:
                        await self._disconnect_all()
            finally:
                self.store.close()
                log.info("store closed")

    def _check_listening(self) -> None:
        """py-libp2p only logs a listener that failed (port in use, address not ours) and runs
        on; a node that cannot be reached must not report itself ready."""
        bound = self.host.get_transport_addrs() if hasattr(self.host, "get_transport_addrs") else []
        if len(bound) < len(self.cfg.p2p.listen):
            bound_text = {str(a) for a in bound}
            missing = [a for a in self.cfg.p2p.listen if a not in bound_text or a.endswith("/tcp/0")]
            raise ListenError(
                f"cannot listen on {', '.join(missing) or ', '.join(self.cfg.p2p.listen)} "
                "(address in use or not on this machine); change [p2p].listen or --listen"
            )

    async def _run_services(self, task_status: TaskStatus[Ready]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_event_loop)
            self.kad = Kademlia(self.host, self.cfg.discovery, self.store.namespace("peers"), self.bootstrap)
            await nursery.start(self.kad.run)
            self.chain = ChainService(self.store, self.genesis, self.key, self.cfg.ledger)
            await nursery.start(self.chain.run)
            self.chain_net = ChainNet(self.host, self.kad, self.chain)
            await nursery.start(self.chain_net.run)
            self.consensus = ConsensusService(
                self.host,
                self.kad,
                self.chain,
                self.store,
                self.key,
                params=self.cfg.consensus.params(),
                test_fault=self.test_fault,
            )
            # Txs go to the primary of the active view; a new view gets what this node holds.
            self.chain_net.primary = self.consensus.active_primary
            self.consensus.on_new_view = self.chain_net.forward_pending
            await nursery.start(self.consensus.run)
            bcfg = self.cfg.breaker
            self.breaker = BreakerService(
                self.host,
                self.store,
                self.chain,
                self.key,
                self.genesis,
                heartbeat_interval=bcfg.heartbeat_interval,
                catchup_interval=bcfg.catchup_interval,
                max_faults=bcfg.max_faults,
                submit_tx=self.chain_net.submit,
                sync_interval=bcfg.sync_interval,
                sync_idle_interval=bcfg.sync_idle_interval,
            )
            await nursery.start(self.breaker.run)
            scfg = self.cfg.shards
            shard_store = await trio.to_thread.run_sync(
                functools.partial(ShardStore, self.home.data_dir, quota=scfg.quota_bytes or None)
            )
            self.shards = ShardService(
                self.host,
                self.kad,
                shard_store,
                self.key,
                self.home.path / "models",
                max_streams_per_peer=scfg.max_streams_per_peer,
                publish_chunk_size=scfg.chunk_size,
                ipfs=ipfs_from_config(self.cfg.ipfs),
                fetch_params=FetchParams(
                    parallel_peers=scfg.fetch_parallel_peers,
                    response_timeout=scfg.fetch_response_timeout,
                    max_failures=scfg.fetch_max_failures,
                ),
            )
            self.shards.is_halted = self.breaker.is_halted
            await nursery.start(self.shards.run)
            self.agents = AgentService(self, is_halted=self._is_halted)
            await nursery.start(self.agents.run)
            self._register_methods()
            LedgerMethods(self.chain, self.chain_net).register(self.control)
            self.consensus.register(self.control)
            ModelMethods(self.shards).register(self.control)
            BreakerMethods(self.breaker).register(self.control)
            self.agents.register(self.control)
            await nursery.start(self.control.run)
            if self.cfg.metrics.enabled:
                self.metrics = MetricsServer(self.cfg.metrics.listen, self._gauges())
                await nursery.start(self.metrics.run)
            ready = Ready(str(self.host.get_id()), listen_addrs(self.host), str(self.home.control_socket))
            log.info("node ready", extra=kv(peer_id=ready.peer_id, network=self.genesis.network))
            task_status.started(ready)

    async def _disconnect_all(self) -> None:
        """Close every connection before the host goes: py-libp2p leaves them open otherwise."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for peer_id in self._connected():
                try:
                    await self.host.disconnect(peer_id)
                except Exception as exc:  # shutdown goes on if one close fails
                    log.debug("disconnect failed", extra=kv(peer=str(peer_id), error=repr(exc)))

    async def _watch_event_loop(self) -> None:
        """Canary: warn when our own code blocks the event loop (a bug: use to_thread).

        A late wake-up with little CPU used by this process is the OS scheduling others
        (dozens of daemons on two cores), not a blocked loop, and is not reported.
        """
        while True:
            before, cpu_before = trio.current_time(), time.process_time()
            await trio.sleep(STALL_CHECK_INTERVAL)
            late = trio.current_time() - before - STALL_CHECK_INTERVAL
            busy = time.process_time() - cpu_before
            if late > STALL_WARN_AFTER and busy > 0.8 * (late + STALL_CHECK_INTERVAL):
                log.warning("event loop blocked", extra=kv(ms=round(late * 1000), cpu_ms=round(busy * 1000)))

    def _is_halted(self, model_id: bytes) -> bool:
        breaker = getattr(self, "breaker", None)
        return breaker is not None and bool(breaker.is_halted(model_id))

    # ---- control methods ----------------------------------------------------------------

    def _register_methods(self) -> None:
        for name, handler in {
            "status": self._status,
            "id": self._id,
            "peers": self._peers,
            "find_peer": self._find_peer,
            "wait_routing_table": self._wait_routing_table,
            "stop": self._stop,
        }.items():
            self.control.register(name, handler)

    def _connected(self) -> list[ID]:
        return list(self.host.get_network().connections)

    async def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.kad is not None
        return {
            "peer_id": str(self.host.get_id()),
            "addrs": listen_addrs(self.host),
            "network": self.genesis.network,
            "chain_id": self.genesis.chain_id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "connected_peers": len(self._connected()),
            "height": self.chain.tip.height if self.chain else 0,
            **self.kad.statistics(),
        }

    async def _id(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "peer_id": str(self.host.get_id()),
            "account": self.key.account.hex(),
            "addrs": listen_addrs(self.host),
        }

    async def _peers(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.kad is not None
        out = []
        for peer_id in self._connected():
            conns = self.host.get_network().connections.get(peer_id, [])
            direction = getattr(conns[0], "direction", None) if conns else None
            out.append(
                {
                    "peer_id": str(peer_id),
                    "addrs": [str(a) for a in self.kad.addrs_of(peer_id)],
                    "direction": getattr(direction, "name", str(direction)).lower()
                    if direction is not None
                    else "unknown",
                    "in_routing_table": peer_id.to_bytes() in self.kad.table,
                }
            )
        return sorted(out, key=lambda p: p["peer_id"])

    async def _find_peer(self, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve a peer. ``lookup: true`` forces an iterative DHT lookup even when the peer
        is already connected or known (benchmarks measure lookups with it)."""
        assert self.kad is not None
        text = param(params, "peer_id", str)
        force_lookup = param(params, "lookup", bool, False)
        peer_id = parse_peer_id(text)
        started = trio.current_time()
        try:
            if peer_id == self.host.get_id():
                addrs, queried = [strip_p2p(a) for a in self.host.get_addrs()], None
            elif force_lookup:
                result = await self.kad.lookup_peer(peer_id)
                assert result.found is not None
                addrs, queried = result.found.addrs, result.queried
            else:
                info = await self.kad.find_peer(peer_id)
                addrs, queried = info.addrs, None
        except DiscoveryError as exc:
            raise RequestError("not_found", str(exc)) from None
        return {
            "peer_id": str(peer_id),
            "addrs": [str(a) for a in addrs],
            "ms": round((trio.current_time() - started) * 1000, 2),
            "queried": queried,
        }

    async def _wait_routing_table(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until the routing table holds ``size`` peers (devnet and tests wait on this)."""
        assert self.kad is not None
        size = param(params, "size", int)
        timeout = param(params, "timeout", float, 60.0)
        if not 0 < timeout <= MAX_WAIT_SECONDS:
            raise RequestError("invalid_params", f"timeout must be in (0, {MAX_WAIT_SECONDS}]")
        with trio.move_on_after(timeout):
            await self.kad.wait_table_size(size)
            return {"routing_table_size": len(self.kad.table)}
        raise RequestError("timeout", f"routing table has {len(self.kad.table)} peers after {timeout} s, wanted {size}")

    async def _stop(self, params: dict[str, Any]) -> AfterReply:
        # The reply must leave before the control socket closes, so stop after sending it.
        return AfterReply({"stopping": True}, lambda: self.stop("stop requested over the control socket"))

    def _gauges(self) -> list[tuple[str, str, str, Any]]:
        assert self.kad is not None
        kad = self.kad
        return [
            ("prsm_connected_peers", "gauge", "Peers with an open connection.", lambda: len(self._connected())),
            ("prsm_routing_table_size", "gauge", "Peers in the Kademlia routing table.", lambda: len(kad.table)),
            ("prsm_open_streams", "gauge", "Open libp2p streams.", self._open_streams),
            ("prsm_protocol_bytes_in_total", "counter", "Bytes received on PRSM protocols.", lambda: TRAFFIC.bytes_in),
            ("prsm_protocol_bytes_out_total", "counter", "Bytes sent on PRSM protocols.", lambda: TRAFFIC.bytes_out),
            ("prsm_kad_lookups_total", "counter", "Kademlia lookups started.", lambda: kad.lookups),
            (
                "prsm_uptime_seconds",
                "gauge",
                "Seconds since the node started.",
                lambda: round(time.time() - self.started_at, 1),
            ),
        ]

    def _open_streams(self) -> int:
        total = 0
        for conns in self.host.get_network().connections.values():
            for conn in conns:
                total += len(conn.get_streams())
        return total

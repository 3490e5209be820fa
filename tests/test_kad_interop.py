"""Interop: py-libp2p's own Kademlia (``libp2p.kad_dht.KadDHT``) against PRSM nodes.

A "standard implementation set to our protocol id" is py-libp2p's KadDHT, unchanged except
for the protocol id it speaks. KadDHT ignores its ``protocol_prefix`` argument (0.8.1): the id
is the module constant ``libp2p.kad_dht.common.PROTOCOL_ID``, imported by name into several
modules, so every module holding it is patched to ``/prsm/kad/1.0.0`` for the test.

Proved here:
1. KadDHT's iterative FIND_NODE lookups are answered by PRSM nodes: it resolves PRSM peers it
   was never given, to their exact listen addresses.
2. PRSM nodes use KadDHT as a peer: our codec decodes its PING and FIND_NODE answers
   (extra fields such as ``senderRecord`` / ``signedRecord`` are skipped), and a PRSM node whose
   only bootstrap peer is the KadDHT node joins the PRSM network through it and resolves peers.
3. Negative control: KadDHT on its default ``/ipfs/kad/1.0.0`` gets nothing from PRSM nodes and
   PRSM nodes get nothing from it -- the connection works, protocol negotiation does not.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.secp256k1 import create_new_key_pair as new_secp256k1_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import common as kad_common
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from prsm_node.config import Config
from prsm_node.exceptions import DiscoveryError
from prsm_node.home import Home, init_home
from prsm_node.kad import messages as m
from prsm_node.kad.service import PROTOCOL_ID as PRSM_KAD
from prsm_node.kad.service import strip_p2p
from prsm_node.node import Node

from .conftest import running_nodes

IPFS_KAD = TProtocol("/ipfs/kad/1.0.0")

# Modules of py-libp2p 0.8.1 that bind PROTOCOL_ID at import time (routing_table.py imports it
# from common lazily, inside add_peer, so patching common covers it).
KAD_MODULES = [
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
]


@pytest.fixture
def kad_dht_on_prsm_id(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Point py-libp2p's KadDHT at /prsm/kad/1.0.0 (undone after the test)."""
    assert kad_common.PROTOCOL_ID == IPFS_KAD
    holders = sorted(
        name
        for name, mod in list(sys.modules.items())
        if name.startswith("libp2p.") and getattr(mod, "PROTOCOL_ID", None) == IPFS_KAD
    )
    assert set(KAD_MODULES) <= set(holders), holders  # py-libp2p moved the constant: revisit
    for name in holders:
        monkeypatch.setattr(sys.modules[name], "PROTOCOL_ID", PRSM_KAD)
    return holders


def bare_addrs(host: IHost) -> set[str]:
    return {str(strip_p2p(a)) for a in host.get_addrs()}


@asynccontextmanager
async def foreign_dht(mode: DHTMode = DHTMode.SERVER) -> AsyncIterator[tuple[IHost, KadDHT]]:
    """A plain py-libp2p host (secp256k1 identity, Noise, yamux) running py-libp2p's KadDHT."""
    key_pair = new_secp256k1_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        # no auto-dialling of the whole peerstore, no 250 ms happy-eyeballs wait per dial
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0, max_connections_per_peer=1),
    )
    async with host.run(listen):
        # The default per-/24 cap (2) only counts globally routable addresses, so it would not
        # bite on 127.0.0.1; disabled anyway so a loopback network is never trimmed.
        dht = KadDHT(host, mode, max_peers_per_subnet=0)
        try:
            async with background_trio_service(dht):
                yield host, dht
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for peer_id in list(host.get_network().connections):
                    try:
                        await host.disconnect(peer_id)
                    except Exception:
                        pass


async def connect(host: IHost, node: Node) -> None:
    addrs = [strip_p2p(a) for a in node.host.get_addrs()]
    await host.connect(PeerInfo(node.host.get_id(), addrs))


def known_addrs(host: IHost, peer_id: ID) -> set[str]:
    try:
        return {str(strip_p2p(a)) for a in host.get_peerstore().addrs(peer_id)}
    except Exception:  # unknown peer
        return set()


@asynccontextmanager
async def extra_node(root: Path, name: str, bootstrap: list[str]) -> AsyncIterator[Node]:
    """One more PRSM node, with the given bootstrap addresses (running_nodes picks its own)."""
    async with trio.open_nursery() as nursery:
        home = Home(root / name)
        init_home(home, cfg=Config.for_tests())
        node = Node(home, home.load_config(), home.load_key(), home.load_genesis(), bootstrap)
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop("test finished")


async def test_kad_dht_lookups_are_answered_by_prsm_nodes(short_tmp: Path, kad_dht_on_prsm_id: list[str]) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol", "dave"]) as nodes:
        alice = nodes["alice"]
        with trio.fail_after(10):
            for node in nodes.values():
                assert node.kad is not None
                await node.kad.wait_table_size(3)
        assert alice.kad is not None
        served_before = alice.kad.requests_served
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            with trio.fail_after(10):
                await connect(host, alice)
            for name in ("bob", "carol", "dave"):
                target = nodes[name].host.get_id()
                # the foreign peer was given alice only; anything it knows of the others came
                # from FIND_NODE answers on /prsm/kad/1.0.0 (PRSM speaks nothing else that
                # carries addresses, and it cannot have connected to a peer it had no address for)
                with trio.fail_after(10):
                    closest = await dht.peer_routing.find_closest_peers_network(target.to_bytes())
                assert closest and closest[0] == target, (name, closest)
                with trio.fail_after(10):
                    info = await dht.find_peer(target)
                assert info is not None and info.peer_id == target
                assert {str(strip_p2p(a)) for a in info.addrs} == bare_addrs(nodes[name].host)
        # alice answered it, and took it into her routing table as a live peer
        assert alice.kad.requests_served > served_before
        assert host.get_id().to_bytes() in alice.kad.table


async def test_prsm_nodes_use_kad_dht_as_a_peer(short_tmp: Path, kad_dht_on_prsm_id: list[str]) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        with trio.fail_after(10):
            for node in nodes.values():
                assert node.kad is not None
                await node.kad.wait_table_size(2)
        assert bob.kad is not None
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            foreign = host.get_id()
            # the foreign peer learns the network through alice (its own lookup, test 1)
            with trio.fail_after(10):
                await connect(host, alice)
                closest = await dht.peer_routing.find_closest_peers_network(foreign.to_bytes())
            assert {alice.host.get_id(), bob.host.get_id(), carol.host.get_id()} <= set(closest)

            # our client, their server: PING and FIND_NODE over /prsm/kad/1.0.0, our codec
            bob.host.get_peerstore().add_addrs(foreign, [strip_p2p(a) for a in host.get_addrs()], 0)
            with trio.fail_after(10):
                pong = await bob.kad.request(foreign, m.KadMessage(type=m.MessageType.PING))
            assert pong.type == m.MessageType.PING
            carol_id = carol.host.get_id()
            with trio.fail_after(10):
                resp = await bob.kad.request(
                    foreign, m.KadMessage(type=m.MessageType.FIND_NODE, key=carol_id.to_bytes())
                )
            # KadDHT (like go-libp2p-kad-dht) does not echo the key in a FIND_NODE answer; we
            # do not require it
            assert resp.type == m.MessageType.FIND_NODE
            by_id = {ID(p.id): p for p in resp.closer_peers}
            assert carol_id in by_id and alice.host.get_id() in by_id
            assert bob.host.get_id() not in by_id  # the requester is left out
            assert {str(multiaddr.Multiaddr(a)) for a in by_id[carol_id].addrs} >= bare_addrs(carol.host)
            # asking the foreign peer for itself returns its own record (FIND_PEER exception)
            with trio.fail_after(10):
                resp = await bob.kad.request(
                    foreign, m.KadMessage(type=m.MessageType.FIND_NODE, key=foreign.to_bytes())
                )
            # (KadDHT lists itself first but with no addrs field: its own addresses are not in
            # its peerstore, they ride only in Peer.signedRecord, which our codec skips)
            assert resp.closer_peers and ID(resp.closer_peers[0].id) == foreign
            print("KadDHT's entry for itself:", resp.closer_peers[0])
            assert foreign.to_bytes() in bob.kad.table

            # a PRSM node whose only bootstrap peer is the foreign one joins the PRSM network
            # through it, and resolves a PRSM peer it was never told about
            bootstrap = [f"{next(iter(bare_addrs(host)))}/p2p/{foreign}"]
            async with extra_node(short_tmp, "erin", bootstrap) as erin:
                assert erin.kad is not None
                with trio.fail_after(10):
                    await erin.kad.wait_table_size(4)  # the foreign peer, alice, bob, carol
                assert foreign.to_bytes() in erin.kad.table
                await erin.host.disconnect(carol_id)
                erin.kad.table.failed(carol_id.to_bytes())
                erin.host.get_peerstore().clear_addrs(carol_id)
                with trio.fail_after(10):
                    result = await erin.kad.lookup(carol_id.to_bytes(), target=carol_id)
                assert result.found is not None and result.found.peer_id == carol_id
                with trio.fail_after(10):
                    info = await erin.kad.find_peer(carol_id)
                assert {str(a) for a in info.addrs} == bare_addrs(carol.host)


async def test_kad_dht_on_ipfs_id_never_mixes_with_prsm(short_tmp: Path) -> None:
    assert kad_common.PROTOCOL_ID == IPFS_KAD  # the default, unpatched
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, carol = nodes["alice"], nodes["carol"]
        with trio.fail_after(10):
            for node in nodes.values():
                assert node.kad is not None
                await node.kad.wait_table_size(2)
        assert alice.kad is not None
        served_before = alice.kad.requests_served
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            foreign = host.get_id()
            with trio.fail_after(10):
                await connect(host, alice)  # transport, Noise and yamux are shared: this works
            assert alice.host.get_id() in host.get_network().connections
            # protocol negotiation is where the networks part
            with trio.fail_after(10), pytest.raises(Exception) as info:
                await host.new_stream(alice.host.get_id(), [IPFS_KAD])
            print("negotiation error:", type(info.value).__name__, info.value)
            carol_id = carol.host.get_id()
            with trio.fail_after(10):
                closest = await dht.peer_routing.find_closest_peers_network(carol_id.to_bytes())
                found = await dht.find_peer(carol_id)
            assert carol_id not in closest and found is None
            assert not known_addrs(host, carol_id)
            # and the other way round: a PRSM node cannot talk kad to it either
            with trio.fail_after(10), pytest.raises(DiscoveryError):
                await alice.kad.request(foreign, m.KadMessage(type=m.MessageType.PING))
            assert alice.kad.requests_served == served_before
            assert foreign.to_bytes() not in alice.kad.table
            assert dht.get_routing_table_size() == 0

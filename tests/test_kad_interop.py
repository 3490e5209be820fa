"""Interop: py-libp2p's own Kademlia (``libp2p.kad_dht.KadDHT``) on a PRSM network.

A "standard implementation set to our protocol id" is py-libp2p's KadDHT, unchanged except for
the protocol id it speaks. In py-libp2p 0.8.1 KadDHT stores its ``protocol_prefix`` argument and
never uses it: the id is the module constant ``libp2p.kad_dht.common.PROTOCOL_ID``, imported by
name into several modules, so the fixture below patches every module that holds it.

What the tests prove:
1. KadDHT (server or client mode) resolves PRSM peers it was never given, to their exact listen
   addresses: its iterative FIND_NODE requests are answered by PRSM nodes.
2. PRSM nodes use KadDHT as a peer: our codec decodes its PING and FIND_NODE answers (its extra
   ``senderRecord`` / ``signedRecord`` fields are skipped), a PRSM node finds the KadDHT peer by
   lookup, and a PRSM node whose only bootstrap peer is the KadDHT node joins the PRSM network
   through it.
3. Provider records work both ways: KadDHT finds providers PRSM nodes announced (from its own
   GET_PROVIDERS lookup through PRSM nodes, and from ADD_PROVIDER requests PRSM nodes sent it),
   and PRSM nodes find providers KadDHT announced (its fire-and-forget ADD_PROVIDER is stored by
   PRSM nodes, and its GET_PROVIDERS answers decode). Values of a namespace PRSM has not
   registered (KadDHT's ``/pk/``) are not stored or served: KadDHT reports "nothing found".
4. Negative control: KadDHT on its default ``/ipfs/kad/1.0.0`` connects (TCP, Noise and yamux are
   shared) but gets no answer from PRSM nodes, and they get none from it: protocol negotiation
   fails both ways, so the two networks never mix.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.secp256k1 import create_new_key_pair as new_secp256k1_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.kad_dht import common as kad_common
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.exceptions import MultiselectClientError
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

# The py-libp2p 0.8.1 modules that bind PROTOCOL_ID at import time. routing_table.py imports it
# from common inside add_peer (its server-mode check), so patching common covers that one.
KAD_MODULES = {
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
}


@pytest.fixture
def kad_dht_on_prsm_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make py-libp2p's KadDHT speak /prsm/kad/1.0.0 (monkeypatch undoes it after the test)."""
    assert kad_common.PROTOCOL_ID == IPFS_KAD
    holders = {
        name
        for name, mod in list(sys.modules.items())
        if name.startswith("libp2p.") and getattr(mod, "PROTOCOL_ID", None) == IPFS_KAD
    }
    assert KAD_MODULES <= holders, holders  # if this fails, py-libp2p moved the constant
    for name in holders:
        monkeypatch.setattr(sys.modules[name], "PROTOCOL_ID", PRSM_KAD)


@asynccontextmanager
async def foreign_dht(mode: DHTMode) -> AsyncIterator[tuple[IHost, KadDHT]]:
    """A plain py-libp2p host (secp256k1 identity, unlike our ed25519; Noise; yamux) running
    py-libp2p's KadDHT as a service, the way py-libp2p's examples run it."""
    key_pair = new_secp256k1_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0, max_connections_per_peer=1),
    )
    async with host.run(listen):
        # max_peers_per_subnet: the default cap (2 peers per /24 per bucket) only counts globally
        # routable addresses, so it would not bite on 127.0.0.1; 0 disables it outright.
        dht = KadDHT(host, mode, max_peers_per_subnet=0)
        try:
            async with background_trio_service(dht):
                # Let its start-up routing table refresh finish now, while it knows no peer (a
                # no-op), so that no lookup of its own races the test's. Its next refresh is
                # 300-600 s away and random walk is off.
                await trio.testing.wait_all_tasks_blocked()
                yield host, dht
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for peer_id in list(host.get_network().connections):
                    try:
                        await host.disconnect(peer_id)
                    except Exception:  # already gone
                        pass


def bare_addrs(host: IHost) -> set[str]:
    """A host's listen addresses, without /p2p/."""
    return {str(strip_p2p(a)) for a in host.get_addrs()}


def known_addrs(host: IHost, peer_id: ID) -> set[str]:
    try:
        return {str(strip_p2p(a)) for a in host.get_peerstore().addrs(peer_id)}
    except Exception:  # PeerStoreError: unknown peer
        return set()


async def connect(host: IHost, node: Node) -> None:
    await host.connect(PeerInfo(node.host.get_id(), [strip_p2p(a) for a in node.host.get_addrs()]))


async def find_node(node: Node, peer_id: ID, key: bytes) -> m.KadMessage:
    assert node.kad is not None
    return await node.kad.request(peer_id, m.KadMessage(type=m.MessageType.FIND_NODE, key=key))


async def network_of(nodes: dict[str, Node]) -> None:
    with trio.fail_after(10):
        for node in nodes.values():
            assert node.kad is not None
            await node.kad.wait_table_size(len(nodes) - 1)


@asynccontextmanager
async def extra_node(root: Path, name: str, bootstrap: list[str]) -> AsyncIterator[Node]:
    """One more PRSM node with the bootstrap list we choose (running_nodes picks its own)."""
    async with trio.open_nursery() as nursery:
        home = Home(root / name)
        init_home(home, cfg=Config.for_tests())
        node = Node(home, home.load_config(), home.load_key(), home.load_genesis(), bootstrap)
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop("test finished")


async def test_kad_dht_resolves_prsm_peers_through_prsm_nodes(short_tmp: Path, kad_dht_on_prsm_id: None) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol", "dave"]) as nodes:
        await network_of(nodes)
        alice = nodes["alice"]
        assert alice.kad is not None
        served_before = alice.kad.requests_served
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            with trio.fail_after(10):
                await connect(host, alice)
            # It was given alice only. All it can know of the others comes from FIND_NODE answers
            # on /prsm/kad/1.0.0: no other PRSM protocol carries peer addresses, and it cannot
            # have reached (and identified) a peer whose address it did not have.
            for name in ("bob", "carol", "dave"):
                target = nodes[name].host.get_id()
                with trio.fail_after(10):
                    closest = await dht.peer_routing.find_closest_peers_network(target.to_bytes())
                assert closest and closest[0] == target, (name, closest)
                with trio.fail_after(10):
                    info = await dht.find_peer(target)
                assert info is not None and info.peer_id == target
                assert {str(strip_p2p(a)) for a in info.addrs} == bare_addrs(nodes[name].host)
            # and it then knows every PRSM node as a DHT server
            assert {n.host.get_id() for n in nodes.values()} <= set(dht.routing_table.get_peer_ids())
        # alice answered it and took the (server-mode) peer into her routing table
        assert alice.kad.requests_served > served_before
        assert host.get_id().to_bytes() in alice.kad.table


async def test_kad_dht_client_mode_uses_prsm_nodes(short_tmp: Path, kad_dht_on_prsm_id: None) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await network_of(nodes)
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        async with foreign_dht(DHTMode.CLIENT) as (host, dht):
            with trio.fail_after(10):
                await connect(host, alice)
                info = await dht.find_peer(carol.host.get_id())
            assert info is not None and {str(strip_p2p(a)) for a in info.addrs} == bare_addrs(carol.host)
            # alice served a client: it must not enter her routing table (it serves no kad)
            assert alice.kad is not None
            with trio.fail_after(10):
                while alice.kad._verifying:
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            assert host.get_id().to_bytes() not in alice.kad.table
            # a client offers no kad protocol: PRSM nodes cannot query it
            assert bob.kad is not None
            bob.host.get_peerstore().add_addrs(host.get_id(), [strip_p2p(a) for a in host.get_addrs()], 0)
            with trio.fail_after(10), pytest.raises(DiscoveryError):
                await bob.kad.request(host.get_id(), m.KadMessage(type=m.MessageType.PING))


async def test_prsm_nodes_use_kad_dht_as_a_peer(short_tmp: Path, kad_dht_on_prsm_id: None) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await network_of(nodes)
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        assert alice.kad is not None and bob.kad is not None and carol.kad is not None
        alice_id, bob_id, carol_id = (n.host.get_id() for n in (alice, bob, carol))
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            foreign = host.get_id()
            # the foreign peer joins through alice with a lookup of its own id
            with trio.fail_after(10):
                await connect(host, alice)
                closest = await dht.peer_routing.find_closest_peers_network(foreign.to_bytes())
            assert {alice_id, bob_id, carol_id} <= set(closest)

            # A PRSM node finds the foreign peer by lookup: carol forgets it, then resolves it
            # through alice and bob, and connects to the address they hand out.
            with trio.fail_after(10):
                await carol.host.disconnect(foreign)
            carol.kad.table.failed(foreign.to_bytes())
            carol.host.get_peerstore().clear_addrs(foreign)
            with trio.fail_after(10):
                result = await carol.kad.lookup(foreign.to_bytes(), target=foreign)
            assert result.found is not None and {str(a) for a in result.found.addrs} == bare_addrs(host)
            with trio.fail_after(10):
                info = await carol.kad.find_peer(foreign)
            assert {str(a) for a in info.addrs} == bare_addrs(host)
            assert foreign in carol.host.get_network().connections

            # Our client, their server: PING and FIND_NODE, decoded by our codec.
            with trio.fail_after(10):
                pong = await bob.kad.request(foreign, m.KadMessage(type=m.MessageType.PING))
            assert pong.type == m.MessageType.PING
            with trio.fail_after(10):
                resp = await find_node(bob, foreign, carol_id.to_bytes())
            # KadDHT, like go-libp2p-kad-dht, does not echo the key in a FIND_NODE answer; PRSM
            # does not require it
            assert resp.type == m.MessageType.FIND_NODE
            by_id = {ID(p.id): p for p in resp.closer_peers}
            assert bob_id not in by_id  # the requester is left out
            assert ID(resp.closer_peers[0].id) == carol_id  # the target first
            # KadDHT sends addresses with a /p2p/<id> suffix (PRSM sends them bare); we accept both
            for peer_id, node in ((carol_id, carol), (alice_id, alice)):
                addrs = {str(strip_p2p(multiaddr.Multiaddr(a))) for a in by_id[peer_id].addrs}
                assert addrs == bare_addrs(node.host)
            # a random 32-byte key, as our bucket refresh sends, is answered too
            with trio.fail_after(10):
                resp = await find_node(bob, foreign, os.urandom(32))
            assert {alice_id, carol_id} <= {ID(p.id) for p in resp.closer_peers}
            # KadDHT lists itself first when asked for its own id, but without an addrs field:
            # its own addresses are not in its peerstore and travel only inside Peer.signedRecord
            # (field 4), which our codec skips. Harmless: identify gives us its addresses.
            with trio.fail_after(10):
                resp = await find_node(bob, foreign, foreign.to_bytes())
            assert resp.closer_peers and ID(resp.closer_peers[0].id) == foreign
            assert foreign.to_bytes() in bob.kad.table

            # The foreign peer as a hop: a PRSM node whose only bootstrap peer is the KadDHT node
            # joins the PRSM network through it (a fresh home: no saved peers).
            bootstrap = [f"{a}/p2p/{foreign}" for a in sorted(bare_addrs(host))]
            async with extra_node(short_tmp, "erin", bootstrap) as erin:
                assert erin.kad is not None
                with trio.fail_after(10):
                    await erin.kad.wait_table_size(4)
                assert {p.to_bytes() for p in (foreign, alice_id, bob_id, carol_id)} <= set(erin.kad.table.peers())
                with trio.fail_after(10):
                    info = await erin.kad.find_peer(carol_id)
                assert {str(a) for a in info.addrs} == bare_addrs(carol.host)


async def test_provider_records_work_both_ways_with_kad_dht(short_tmp: Path, kad_dht_on_prsm_id: None) -> None:
    ours, early, theirs = (hashlib.sha256(name).digest() for name in (b"ours", b"early", b"theirs"))
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await network_of(nodes)
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        assert alice.kad is not None and bob.kad is not None and carol.kad is not None
        with trio.fail_after(10):
            assert await bob.kad.provide(early) == 2  # before the foreign peer exists
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            foreign = host.get_id()
            with trio.fail_after(10):
                await connect(host, alice)
                await dht.peer_routing.find_closest_peers_network(foreign.to_bytes())
                await carol.kad.wait_table_size(3)
            assert foreign.to_bytes() in carol.kad.table

            # PRSM -> KadDHT. It was never told about `early`: its GET_PROVIDERS lookup asks PRSM
            # nodes. py-libp2p returns a provider once per peer that named it; we compare sets.
            with trio.fail_after(10):
                found = await dht.find_providers(early.hex())
            assert {p.peer_id for p in found} == {bob.host.get_id()}
            assert {str(strip_p2p(a)) for p in found for a in p.addrs} == bare_addrs(bob.host)
            # and our ADD_PROVIDER reaches its store (it answers with an echo, as we require)
            with trio.fail_after(10):
                assert await carol.kad.provide(ours) == 3
            stored = dht.provider_store.get_providers(ours)
            assert [p.peer_id for p in stored] == [carol.host.get_id()]
            with trio.fail_after(10):
                assert {p.peer_id for p in await dht.find_providers(ours.hex())} == {carol.host.get_id()}

            # KadDHT -> PRSM. Its ADD_PROVIDER is fire-and-forget (it reads no answer), so wait
            # until the PRSM nodes have stored it.
            with trio.fail_after(10):
                assert await dht.provide(theirs.hex())
                while not all(n.kad is not None and n.kad.local_providers(theirs) for n in nodes.values()):
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            for node in (alice, bob, carol):
                assert node.kad is not None
                infos = node.kad.local_providers(theirs)
                assert [i.peer_id for i in infos] == [foreign]
                assert {str(a) for a in infos[0].addrs} == bare_addrs(host)  # its /p2p/ suffix stripped
            # its GET_PROVIDERS answers decode (signedRecord skipped), itself listed once
            with trio.fail_after(10):
                resp = await bob.kad.request(foreign, m.KadMessage(type=m.MessageType.GET_PROVIDERS, key=theirs))
            assert [ID(p.id) for p in resp.provider_peers] == [foreign]
            # a PRSM node that joins now finds it through PRSM nodes and through KadDHT itself
            async with extra_node(
                short_tmp, "erin", [f"{a}/p2p/{alice.host.get_id()}" for a in bare_addrs(alice.host)]
            ) as erin:
                assert erin.kad is not None
                with trio.fail_after(10):
                    await erin.kad.wait_table_size(4)
                    found = await erin.kad.find_providers(theirs)
                assert [p.peer_id for p in found] == [foreign]
                assert {str(a) for a in found[0].addrs} == bare_addrs(host)

            # values of a namespace PRSM has not registered: not stored, not served
            with trio.fail_after(10):
                assert await dht.get_value("/pk/key") is None
                info = await dht.find_peer(carol.host.get_id())
            assert info is not None and {str(strip_p2p(a)) for a in info.addrs} == bare_addrs(carol.host)


def negotiation_failed(exc: BaseException) -> bool:
    """True if ``exc`` comes from a multistream-select 'na' (protocol not supported)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MultiselectClientError) and "protocol not supported" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_kad_dht_on_ipfs_id_never_mixes_with_prsm(short_tmp: Path) -> None:
    assert kad_common.PROTOCOL_ID == IPFS_KAD  # py-libp2p's default, unpatched
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await network_of(nodes)
        alice, carol = nodes["alice"], nodes["carol"]
        assert alice.kad is not None
        served_before = alice.kad.requests_served
        async with foreign_dht(DHTMode.SERVER) as (host, dht):
            foreign, alice_id, carol_id = host.get_id(), alice.host.get_id(), carol.host.get_id()
            with trio.fail_after(10):
                await connect(host, alice)  # TCP, Noise and yamux are the same: this works
            assert alice_id in host.get_network().connections
            # protocol negotiation is where the two networks part
            with trio.fail_after(10), pytest.raises(StreamFailure) as failure:
                await host.new_stream(alice_id, [IPFS_KAD])
            assert negotiation_failed(failure.value), repr(failure.value)
            with trio.fail_after(10):
                closest = await dht.peer_routing.find_closest_peers_network(carol_id.to_bytes())
                found = await dht.find_peer(carol_id)
            assert carol_id not in closest and found is None
            assert not known_addrs(host, carol_id)
            assert dht.get_routing_table_size() == 0
            # and the other way round: a PRSM node cannot use it either
            with trio.fail_after(10), pytest.raises(StreamFailure) as failure:
                await alice.host.new_stream(foreign, [PRSM_KAD])
            assert negotiation_failed(failure.value), repr(failure.value)
            with trio.fail_after(10), pytest.raises(DiscoveryError):
                await alice.kad.request(foreign, m.KadMessage(type=m.MessageType.PING))
            assert alice.kad.requests_served == served_before
            assert foreign.to_bytes() not in alice.kad.table

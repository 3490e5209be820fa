"""In-process nodes: real libp2p hosts on 127.0.0.1, real Kademlia, temp homes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from prsm_node.config import Config
from prsm_node.home import Home, init_home
from prsm_node.kad import messages as m
from prsm_node.kad.service import PROTOCOL_ID
from prsm_node.node import Node
from prsm_node.wire import encode_uvarint, read_frame, write_frame

from .conftest import running_nodes


async def test_three_nodes_discover_each_other(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        with trio.fail_after(10):
            for node in (alice, bob, carol):
                assert node.kad is not None
                await node.kad.wait_table_size(2)
        # carol learned bob through the DHT (she was only given alice's address)
        assert carol.kad is not None and bob.kad is not None
        with trio.fail_after(5):
            info = await carol.kad.find_peer(bob.host.get_id())
        assert [str(a) for a in info.addrs] == [str(a).split("/p2p/")[0] for a in bob.host.get_addrs()]
        peers = await alice._peers({})
        assert {p["direction"] for p in peers} <= {"inbound", "outbound"} and len(peers) == 2


async def test_a_dead_bootstrap_peer_does_not_hold_up_joining(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMbbPVGsZYh3ChQjue712NHHGNybRRXwnuSpezYjGbCDS"
        home = Home(short_tmp / "carol")
        init_home(home, cfg=Config.for_tests())
        carol = Node(
            home, home.load_config(), home.load_key(), home.load_genesis(), [dead, str(alice.host.get_addrs()[0])]
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(carol.run)
            assert carol.kad is not None
            with trio.fail_after(10):
                await carol.kad.wait_table_size(2)  # bob, learned by the self-lookup
            assert bob.host.get_id().to_bytes() in carol.kad.table
            carol.stop("test finished")


async def test_lookup_finds_a_peer_we_were_not_connected_to(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol", "dave"]) as nodes:
        with trio.fail_after(10):
            for node in nodes.values():
                assert node.kad is not None
                await node.kad.wait_table_size(3)
        carol, dave = nodes["carol"], nodes["dave"]
        assert carol.kad is not None
        dave_id = dave.host.get_id()
        # forget everything carol knows about dave, then resolve him through the DHT
        await carol.host.disconnect(dave_id)
        carol.kad.table.failed(dave_id.to_bytes())
        carol.host.get_peerstore().clear_addrs(dave_id)
        with trio.fail_after(5):
            result = await carol.kad.lookup(dave_id.to_bytes(), target=dave_id)
        assert result.found is not None and result.found.peer_id == dave_id
        with trio.fail_after(5):
            info = await carol.kad.find_peer(dave_id)
        assert info.addrs


async def _raw_stream(node, target):  # type: ignore[no-untyped-def]
    return await node.host.new_stream(target.host.get_id(), [PROTOCOL_ID])


async def test_bad_kad_input_leaves_the_node_serving(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        with trio.fail_after(10):
            assert bob.kad is not None
            await bob.kad.wait_table_size(1)
        bad_inputs = [
            encode_uvarint(m.MAX_MESSAGE_SIZE + 1) + b"x" * 100,  # oversized length
            b"\xff" * 11,  # varint that never ends
            encode_uvarint(5) + b"\x08\x63\x12\x01",  # cut-off body
            encode_uvarint(3) + b"\x08\x63\x00",  # unknown message type 99
            encode_uvarint(4) + b"\x12\x7f\x00\x00",  # length past the end
        ]
        for raw in bad_inputs:
            with trio.fail_after(5):
                stream = await _raw_stream(bob, alice)
                await stream.write(raw)
                try:
                    await stream.close()
                except Exception:
                    pass
        # a GET_VALUE whose key has no registered /namespace/ gets a reset, not an answer
        with trio.fail_after(5):
            stream = await _raw_stream(bob, alice)
            await write_frame(stream, m.encode(m.KadMessage(type=m.MessageType.GET_VALUE, key=b"k")))
            try:
                got = await read_frame(stream, m.MAX_MESSAGE_SIZE)
            except Exception:
                got = None
            assert got is None
        # alice still answers lookups, on new streams and on the same connection
        with trio.fail_after(5):
            resp = await bob.kad.request(alice.host.get_id(), m.KadMessage(type=m.MessageType.FIND_NODE, key=b"x" * 34))
        assert resp.type == m.MessageType.FIND_NODE
        # a remote peer's garbage is an info line, never an error with a traceback
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("prsm_node")]


async def test_peers_whose_identify_failed_do_not_verify_each_other_forever(short_tmp: Path) -> None:
    """Two peers with addresses but no identify record of each other's protocols: a request
    served starts a verification of the requester (it might be a client); its answer proves it
    serves kad. Found in a 50-node devnet: without remembering that, each verification's request
    started the other side's, forever (~30 streams/s and half a core on each node)."""
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        assert alice.kad is not None and bob.kad is not None
        with trio.fail_after(10):
            await bob.kad.wait_table_size(1)
            await alice.kad.wait_table_size(1)
            while alice.kad._verifying or bob.kad._verifying:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        a, b = alice.host.get_id(), bob.host.get_id()
        alice.host.get_peerstore().remove_protocols(b, [PROTOCOL_ID])
        bob.host.get_peerstore().remove_protocols(a, [PROTOCOL_ID])
        served = alice.kad.requests_served + bob.kad.requests_served
        with trio.fail_after(10):
            await bob.kad.request(a, m.KadMessage(type=m.MessageType.PING))
            # settles: at most one verification on alice's side (bob answered a request of
            # hers), none on bob's (alice answered his)
            while alice.kad._verifying or bob.kad._verifying:
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert alice.kad.requests_served + bob.kad.requests_served - served <= 3
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        assert not alice.kad._verifying and not bob.kad._verifying
        assert alice.kad.requests_served + bob.kad.requests_served - served <= 3


async def test_several_requests_share_one_stream(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        with trio.fail_after(5):
            stream = await _raw_stream(bob, alice)
            for _ in range(3):
                await write_frame(
                    stream, m.encode(m.KadMessage(type=m.MessageType.FIND_NODE, key=bob.host.get_id().to_bytes()))
                )
                resp = m.decode(await read_frame(stream, m.MAX_MESSAGE_SIZE))
                assert resp.type == m.MessageType.FIND_NODE
                assert all(ID(p.id) != bob.host.get_id() for p in resp.closer_peers)
            await stream.close()


async def test_py_libp2p_auto_connector_does_not_dial_known_peers(short_tmp: Path) -> None:
    """Only discovery decides whom to dial; py-libp2p's auto-connector would dial every peer
    in the peerstore (every 30 s and after each disconnect)."""
    async with running_nodes(short_tmp, ["alice"]) as first, running_nodes(short_tmp / "b", ["bob"]) as second:
        alice, bob = first["alice"], second["bob"]
        bob.host.get_peerstore().add_addrs(alice.host.get_id(), alice.host.get_addrs(), 0)
        await bob.host.get_network().auto_connector.maybe_connect()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert alice.host.get_id() not in bob.host.get_network().connections

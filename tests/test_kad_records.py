"""Provider records and validated values in our Kademlia: real hosts on 127.0.0.1, and the pure
stores driven by an injected clock."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from prsm_node.config import Config
from prsm_node.home import Home, init_home
from prsm_node.kad import messages as m
from prsm_node.kad.providers import ProviderStore, WriteLimiter
from prsm_node.kad.service import PROTOCOL_ID, Kademlia, strip_p2p
from prsm_node.kad.values import MAX_VALUE_SIZE, InvalidRecord, ValueNotFound, ValueStore
from prsm_node.node import Node
from prsm_node.wire import read_frame, write_frame

from .conftest import running_nodes

KEY = hashlib.sha256(b"model manifest").digest()
NS = b"/test-signed/"
OWNER = SigningKey(b"\x07" * 32)


def kad(node: Node) -> Kademlia:
    assert node.kad is not None
    return node.kad


async def wait_network(nodes: dict[str, Node]) -> None:
    with trio.fail_after(10):
        for node in nodes.values():
            await kad(node).wait_table_size(len(nodes) - 1)


@asynccontextmanager
async def late_node(root: Path, name: str, bootstrap: Node) -> AsyncIterator[Node]:
    """A node that joins after the others, through ``bootstrap``."""
    async with trio.open_nursery() as nursery:
        home = Home(root / name)
        init_home(home, cfg=Config.for_tests())
        addr = f"{strip_p2p(bootstrap.host.get_addrs()[0])}/p2p/{bootstrap.host.get_id()}"
        node = Node(home, home.load_config(), home.load_key(), home.load_genesis(), [addr])
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop("test finished")


def bare_addrs(node: Node) -> set[str]:
    return {str(strip_p2p(a)) for a in node.host.get_addrs()}


# ---- signed values: a test namespace checked with Ed25519 ------------------------------------


def signed(key: bytes, version: int, data: bytes, signer: SigningKey = OWNER) -> bytes:
    body = version.to_bytes(8, "big") + data
    return signer.sign(key + body).signature + body


def validate_signed(key: bytes, value: bytes) -> None:
    if len(value) < 72:
        raise ValueError("too short")
    try:
        VerifyKey(OWNER.verify_key.encode()).verify(key + value[64:], value[:64])
    except BadSignatureError:
        raise ValueError("bad signature") from None


def select_newest(key: bytes, values: list[bytes]) -> int:
    versions = [int.from_bytes(v[64:72], "big") for v in values]
    return versions.index(max(versions))


def register(*nodes: Node) -> None:
    for node in nodes:
        kad(node).register_namespace(NS, validate_signed, select_newest)


async def raw_request(node: Node, target: Node, msg: m.KadMessage) -> m.KadMessage | None:
    """One request on a raw stream; None if the target reset the stream instead of answering."""
    stream = await node.host.new_stream(target.host.get_id(), [PROTOCOL_ID])
    try:
        await write_frame(stream, m.encode(msg))
        return m.decode(await read_frame(stream, m.MAX_MESSAGE_SIZE))
    except Exception:
        return None
    finally:
        try:
            await stream.close()
        except Exception:
            pass


# ---- provider records over the network ---------------------------------------------------------


async def test_a_node_finds_providers_it_was_never_told_about(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol", "dave"]) as nodes:
        await wait_network(nodes)
        alice, bob = nodes["alice"], nodes["bob"]
        with trio.fail_after(10):
            assert await kad(alice).provide(KEY) == 3
            assert await kad(bob).provide(KEY) == 3
        assert {p.peer_id for p in kad(alice).local_providers(KEY)} == {alice.host.get_id(), bob.host.get_id()}
        # erin joins afterwards: no ADD_PROVIDER ever reached her
        async with late_node(short_tmp, "erin", nodes["carol"]) as erin:
            with trio.fail_after(10):
                await kad(erin).wait_table_size(4)
            assert kad(erin).local_providers(KEY) == []
            with trio.fail_after(10):
                found = await kad(erin).find_providers(KEY)
            # every server names alice and bob: each is listed once, with its own addresses
            assert sorted(str(p.peer_id) for p in found) == sorted(str(n.host.get_id()) for n in (alice, bob))
            for info in found:
                owner = alice if info.peer_id == alice.host.get_id() else bob
                assert {str(a) for a in info.addrs} == bare_addrs(owner)
                assert {str(strip_p2p(a)) for a in erin.host.get_peerstore().addrs(info.peer_id)} >= bare_addrs(owner)
            # count stops the lookup early
            with trio.fail_after(10):
                assert len(await kad(erin).find_providers(KEY, count=1)) == 1
            assert kad(erin).statistics()["provider_lookups"] == 2


async def test_stop_providing_drops_our_record_and_republish_refreshes_others(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await wait_network(nodes)
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        now = [0.0]
        kad(bob).providers.clock = lambda: now[0]
        with trio.fail_after(10):
            assert await kad(alice).provide(KEY) == 2
        assert [p.peer_id for p in kad(bob).local_providers(KEY)] == [alice.host.get_id()]
        now[0] = 20 * 3600.0
        with trio.fail_after(10):
            await kad(alice).republish()  # what the 22 h timer runs
        now[0] = 30 * 3600.0  # past the first record's TTL, not the republished one's
        assert [p.peer_id for p in kad(bob).local_providers(KEY)] == [alice.host.get_id()]
        kad(alice).stop_providing(KEY)
        assert kad(alice).local_providers(KEY) == []
        with trio.fail_after(10):
            await kad(alice).republish()
        now[0] = 45 * 3600.0  # the remote copy expires: nobody announced it again
        assert kad(bob).local_providers(KEY) == []
        assert kad(bob).providers.expire() == 0 and kad(bob).providers.expired == 1
        # carol's copy (on the real clock) lives out its TTL; alice no longer lists herself
        with trio.fail_after(10):
            assert [p.peer_id for p in await kad(carol).find_providers(KEY)] == [alice.host.get_id()]


async def test_a_provider_record_for_another_peer_is_refused(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await wait_network(nodes)
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        carol_record = m.KadPeer(id=carol.host.get_id().to_bytes(), addrs=(carol.host.get_addrs()[0].to_bytes(),))
        forged = m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=KEY, provider_peers=(carol_record,))
        with trio.fail_after(10):
            assert await raw_request(bob, alice, forged) is None
        assert kad(alice).local_providers(KEY) == [] and kad(alice).statistics()["records_refused"] == 1
        # the same request naming bob himself is accepted, and echoed
        own = m.KadPeer(id=bob.host.get_id().to_bytes(), addrs=(bob.host.get_addrs()[0].to_bytes(),))
        honest = m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=KEY, provider_peers=(own,))
        with trio.fail_after(10):
            echo = await raw_request(bob, alice, honest)
        assert echo == m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=KEY)
        assert [p.peer_id for p in kad(alice).local_providers(KEY)] == [bob.host.get_id()]
        # malformed: an empty key, or no record at all
        for bad in (
            m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=b"", provider_peers=(own,)),
            m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=b"x" * 81, provider_peers=(own,)),
            m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=KEY),
        ):
            with trio.fail_after(10):
                assert await raw_request(bob, alice, bad) is None
        with trio.fail_after(10):  # alice still serves
            assert (await kad(bob).request(alice.host.get_id(), m.KadMessage(type=m.MessageType.PING))).type == 5


async def test_a_flood_of_provider_records_stays_bounded(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        kad(alice).providers = ProviderStore(max_keys=20, max_per_key=4, max_keys_per_provider=10)
        kad(alice)._write_limiter = WriteLimiter(burst=40, rate=0.001)
        own = m.KadPeer(id=bob.host.get_id().to_bytes(), addrs=(bob.host.get_addrs()[0].to_bytes(),))
        answered = 0
        with trio.fail_after(20):
            stream = await bob.host.new_stream(alice.host.get_id(), [PROTOCOL_ID])
            for i in range(60):
                key = hashlib.sha256(i.to_bytes(4, "big")).digest()
                await write_frame(
                    stream, m.encode(m.KadMessage(type=m.MessageType.ADD_PROVIDER, key=key, provider_peers=(own,)))
                )
                try:
                    await read_frame(stream, m.MAX_MESSAGE_SIZE)
                except Exception:  # the rate limit: a reset, and a new stream
                    stream = await bob.host.new_stream(alice.host.get_id(), [PROTOCOL_ID])
                    continue
                answered += 1
        assert answered == 40  # the burst; the rest refused
        assert len(kad(alice).providers) == 10  # bob's own cap: his oldest keys went first
        newest = hashlib.sha256((39).to_bytes(4, "big")).digest()
        assert [p.peer_id for p in kad(alice).local_providers(newest)] == [bob.host.get_id()]
        assert kad(alice).statistics()["records_refused"] == 20


# ---- the pure stores --------------------------------------------------------------------------


def test_provider_store_bounds_and_expiry() -> None:
    now = [0.0]
    store = ProviderStore(ttl=100, max_keys=3, max_per_key=2, max_keys_per_provider=5, clock=lambda: now[0])
    peers = [bytes([i]) * 34 for i in range(10)]
    for peer in peers:  # ten providers of one key: the two newest stay
        store.add(b"k", peer, (b"addr",))
    assert [r.peer_id for r in store.get(b"k")] == [peers[9], peers[8]]
    for key in (b"a", b"b", b"c"):  # a fourth key pushes out the least recently announced
        store.add(key, peers[0], ())
    assert store.key_count() == 3 and store.get(b"k") == []
    now[0] = 50
    store.add(b"a", peers[1], ())  # refreshes key a
    now[0] = 100
    assert store.get(b"b") == [] and [r.peer_id for r in store.get(b"a")] == [peers[1]]
    assert store.expire() == 1  # c
    now[0] = 150
    assert store.expire() == 1 and len(store) == 0 and store.key_count() == 0
    with pytest.raises(ValueError):
        store.add(b"", peers[0], ())


def test_write_limiter_refills_and_forgets_idle_peers() -> None:
    now = [0.0]
    limiter = WriteLimiter(burst=2, rate=1.0, max_peers=2, clock=lambda: now[0])
    assert [limiter.allow(b"a") for _ in range(3)] == [True, True, False]
    now[0] = 1.0
    assert limiter.allow(b"a") and not limiter.allow(b"a")
    limiter.allow(b"b")
    limiter.allow(b"c")  # a is forgotten: at most two peers tracked
    assert len(limiter._buckets) == 2


def test_value_store_bounds_and_expiry() -> None:
    now = [0.0]
    store = ValueStore(ttl=10, max_entries=3, max_bytes=100, clock=lambda: now[0])
    for i in range(5):
        store.put(b"/k/%d" % i, b"v" * 10)
    assert len(store) == 3 and store.get(b"/k/0") is None and store.get(b"/k/4") == b"v" * 10
    store.put(b"/k/big", b"x" * 90)  # the byte budget evicts the oldest
    assert store.size_bytes <= 100 and store.get(b"/k/big") == b"x" * 90
    now[0] = 10
    assert store.get(b"/k/big") is None
    store.expire()
    assert len(store) == 0 and store.size_bytes == 0


# ---- values over the network ------------------------------------------------------------------


async def test_signed_values_put_get_and_select_the_newest(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol", "dave"]) as nodes:
        await wait_network(nodes)
        alice, bob, carol, dave = nodes["alice"], nodes["bob"], nodes["carol"], nodes["dave"]
        register(alice, bob, carol, dave)
        key = NS + b"llama"
        v1, v2 = signed(key, 1, b"manifest-1"), signed(key, 2, b"manifest-2")
        with trio.fail_after(10):
            assert await kad(alice).put_value(key, v1) == 3
            assert await kad(carol).get_value(key) == v1
            assert await kad(bob).put_value(key, v2) == 3  # select: version 2 replaces 1 everywhere
            assert await kad(carol).get_value(key) == v2
        # an older value is refused by a server that has a newer one
        put_v1 = m.KadMessage(type=m.MessageType.PUT_VALUE, key=key, record=m.Record(key=key, value=v1))
        with trio.fail_after(10):
            assert await raw_request(alice, dave, put_v1) is None
        # a peer left with an outdated value (written behind the validator's back) loses to the
        # newest, and is corrected
        kad(dave).values.put(key, v1)
        with trio.fail_after(10):
            assert await kad(alice).get_value(key, quorum=3) == v2
            while kad(dave).values.get(key) != v2:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)


async def test_forged_and_unknown_values_are_refused_and_ignored(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        await wait_network(nodes)
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        register(alice, bob, carol)
        key = NS + b"llama"
        forged = signed(key, 9, b"evil", signer=SigningKey(b"\x66" * 32))
        put = m.KadMessage(type=m.MessageType.PUT_VALUE, key=key, record=m.Record(key=key, value=forged))
        with trio.fail_after(10):
            assert await raw_request(bob, alice, put) is None
        assert kad(alice).values.get(key) is None
        with pytest.raises(InvalidRecord):
            await kad(bob).put_value(key, forged)  # our own validator refuses it first
        # a value for another key under a valid signature is forged too
        other = signed(NS + b"other", 1, b"x")
        with trio.fail_after(10):
            assert (
                await raw_request(
                    bob,
                    alice,
                    m.KadMessage(type=m.MessageType.PUT_VALUE, key=key, record=m.Record(key=key, value=other)),
                )
                is None
            )
        # a server that stores garbage anyway (a broken or hostile peer) is ignored by getters
        good = signed(key, 1, b"manifest")
        with trio.fail_after(10):
            await kad(carol).put_value(key, good)
        kad(bob).values.put(key, forged)
        kad(carol).values.put(key, good)
        with trio.fail_after(10):
            assert await kad(alice).get_value(key, quorum=2) == good
        assert kad(alice).statistics()["invalid_values_received"] == 1
        # unknown namespaces: refused by servers, and by our own API
        unknown = b"/nope/x"
        put = m.KadMessage(type=m.MessageType.PUT_VALUE, key=unknown, record=m.Record(key=unknown, value=b"v"))
        with trio.fail_after(10):
            assert await raw_request(bob, alice, put) is None
        for call in (kad(bob).put_value(unknown, b"v"), kad(bob).get_value(unknown)):
            with pytest.raises(InvalidRecord):
                await call
        too_big = signed(key, 5, b"x" * MAX_VALUE_SIZE)
        with pytest.raises(InvalidRecord):
            await kad(bob).put_value(key, too_big)
        with trio.fail_after(10):  # a key outside any namespace can hold no value: malformed
            assert await raw_request(bob, alice, m.KadMessage(type=m.MessageType.GET_VALUE, key=b"k")) is None
            miss = await raw_request(bob, alice, m.KadMessage(type=m.MessageType.GET_VALUE, key=b"/nope/x"))
        assert miss is not None and miss.record is None and miss.closer_peers
        with trio.fail_after(10), pytest.raises(ValueNotFound):
            await kad(alice).get_value(NS + b"missing")

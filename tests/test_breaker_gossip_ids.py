"""Gossip repair asks only for what it lacks: the message ids our gossipsub advertises in
IHAVE are the ids its seen cache holds, so a peer that has a vote does not pull it again with
IWANT (py-libp2p's own cache advertised ``from || seqno`` ids that no seen cache holds)."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.pubsub.pb import rpc_pb2

from prsm_node.breaker import net
from prsm_node.breaker.service import TOPIC
from prsm_node.config import Config
from prsm_node.host import build_host
from prsm_node.keys import NodeKey


def _router() -> Any:
    _, router = net.build_pubsub(build_host(NodeKey.generate(), Config.for_tests()), single_host=True)
    return router


def _message(i: int) -> rpc_pb2.Message:
    return rpc_pb2.Message(
        data=b"vote %d" % i, topicIDs=[TOPIC], from_id=b"peer", seqno=i.to_bytes(8, "big")
    )


def test_the_cache_advertises_our_message_ids() -> None:
    router = _router()
    msgs = [_message(i) for i in range(3)]
    for msg in msgs + msgs[:1]:  # a second copy is not cached twice
        router.mcache.put(msg)
    assert sorted(router.mcache.window(TOPIC)) == sorted(net.message_id(m) for m in msgs)
    assert all(router.mcache.get(net.message_id(m)) is m for m in msgs)


async def test_an_ihave_of_seen_messages_asks_for_nothing() -> None:
    sender, receiver = _router(), _router()
    msgs = [_message(i) for i in range(4)]
    for msg in msgs:
        sender.mcache.put(msg)
    for msg in msgs[:3]:  # the receiver has seen three of the four
        receiver.pubsub.seen_messages.add(net.message_id(msg))
    # The IHAVE as it travels: encoded and decoded.
    wire = rpc_pb2.ControlIHave(topicID=TOPIC, messageIDs=sender.mcache.window(TOPIC)).SerializeToString()
    ihave = rpc_pb2.ControlIHave.FromString(wire)

    asked: list[list[bytes]] = []

    async def record_iwant(msg_ids: list[bytes], to_peer: Any) -> None:
        asked.append(list(msg_ids))

    receiver.emit_iwant = record_iwant
    with trio.fail_after(5):
        await receiver.handle_ihave(ihave, NodeKey.generate().peer_id)
    assert asked == [[net.message_id(msgs[3])]]


def test_a_seen_copy_is_dropped_before_a_task_is_started_for_it() -> None:
    pubsub = _router().pubsub
    pubsub.subscribed_topics_receive[TOPIC] = None  # what subscribe() makes topic_ids hold
    fresh, seen, other = _message(1), _message(2), _message(3)
    other.ClearField("topicIDs")
    other.topicIDs.append("another/topic")
    pubsub.seen_messages.add(net.message_id(seen))
    assert pubsub._is_subscribed_to_msg(fresh)
    assert not pubsub._is_subscribed_to_msg(seen)
    assert not pubsub._is_subscribed_to_msg(other)


def test_gossipsub_builds_no_signed_peer_record() -> None:
    """py-libp2p's routers build one for every message forwarded and every control RPC (a
    getsockname and multiaddr parse per listener), which write_msg strips anyway."""
    from libp2p.pubsub import gossipsub

    host = _router().pubsub.host
    calls: list[int] = []
    real = host.get_addrs
    host.get_addrs = lambda: calls.append(1) or real()  # type: ignore[method-assign]
    envelope, _ = gossipsub.env_to_send_in_RPC(host)
    assert envelope == b"" and calls == []

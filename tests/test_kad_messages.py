"""Tests for prsm_node.kad.messages, checked against py-libp2p's kademlia_pb2.

kademlia_pb2 (google.protobuf, upb backend) is the independent encoder/decoder:
our bytes must parse with it to the same content, its bytes must decode with
ours to the same content, and for the same content the bytes must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import multiaddr
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.kad_dht.pb import kademlia_pb2 as pb
from libp2p.peer.id import ID

from prsm_node.kad.messages import (
    MAX_ADDRS_PER_PEER,
    MAX_CLOSER_PEERS,
    MAX_MESSAGE_SIZE,
    MAX_PEER_ID_LEN,
    MAX_PROVIDER_PEERS,
    ConnectionType,
    KadDecodeError,
    KadMessage,
    KadPeer,
    MessageType,
    Record,
    decode,
    encode,
    encode_frame,
    varint_decode,
    varint_encode,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "protocols" / "kad-vectors.json"
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


# ------------------------------------------------------------ pb conversion


def to_pb(m: KadMessage) -> pb.Message:
    def peer(p: KadPeer) -> pb.Message.Peer:
        return pb.Message.Peer(id=p.id, addrs=list(p.addrs), connection=p.connection.name)

    out = pb.Message(
        type=m.type.name,
        key=m.key,
        clusterLevelRaw=m.cluster_level_raw,
        closerPeers=[peer(p) for p in m.closer_peers],
        providerPeers=[peer(p) for p in m.provider_peers],
    )
    if m.record is not None:
        r = m.record
        out.record.CopyFrom(pb.Record(key=r.key, value=r.value, timeReceived=r.time_received))
    return out


def from_pb(m: pb.Message) -> KadMessage:
    def peer(p: pb.Message.Peer) -> KadPeer:
        return KadPeer(id=p.id, addrs=tuple(p.addrs), connection=ConnectionType(p.connection))

    record = None
    if m.HasField("record"):
        record = Record(key=m.record.key, value=m.record.value, time_received=m.record.timeReceived)
    return KadMessage(
        type=MessageType(m.type),
        key=m.key,
        record=record,
        closer_peers=tuple(peer(p) for p in m.closerPeers),
        provider_peers=tuple(peer(p) for p in m.providerPeers),
        cluster_level_raw=m.clusterLevelRaw,
    )


# ------------------------------------------------------------ strategies

real_addrs = st.sampled_from(
    ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.1.2.3/udp/4001/quic-v1", "/ip6/::1/tcp/9", "/dns4/a.b/tcp/1"]
).map(lambda s: multiaddr.Multiaddr(s).to_bytes())
peers = st.builds(
    KadPeer,
    id=st.binary(max_size=MAX_PEER_ID_LEN),
    addrs=st.lists(real_addrs | st.binary(max_size=40), max_size=4).map(tuple),
    connection=st.sampled_from(ConnectionType),
)
records = st.builds(
    Record,
    key=st.binary(max_size=40),
    value=st.binary(max_size=200),
    time_received=st.text(max_size=40),
)
messages = st.builds(
    KadMessage,
    type=st.sampled_from(MessageType),
    key=st.binary(max_size=64),
    record=st.none() | records,
    closer_peers=st.lists(peers, max_size=6).map(tuple),
    provider_peers=st.lists(peers, max_size=6).map(tuple),
    cluster_level_raw=st.just(0) | INT32,
)


# ------------------------------------------------------------ against kademlia_pb2


@given(messages)
def test_our_bytes_parse_with_pb_and_are_identical(m: KadMessage) -> None:
    ours = encode(m)
    assert from_pb(pb.Message.FromString(ours)) == m
    assert ours == to_pb(m).SerializeToString()


@given(messages)
def test_pb_bytes_decode_with_ours(m: KadMessage) -> None:
    assert decode(to_pb(m).SerializeToString()) == m


@given(messages)
def test_round_trip(m: KadMessage) -> None:
    assert decode(encode(m)) == m


@given(messages)
def test_encode_frame(m: KadMessage) -> None:
    frame = encode_frame(m)
    n, pos = varint_decode(frame)
    assert n == len(frame) - pos and decode(frame[pos:]) == m


def test_defaults_are_omitted_and_explicit_defaults_accepted() -> None:
    # proto3 implicit presence: PUT_VALUE (0), clusterLevelRaw 0, empty key: nothing on the wire.
    assert encode(KadMessage(MessageType.PUT_VALUE)) == b""
    assert pb.Message(type="PUT_VALUE", clusterLevelRaw=0, key=b"").SerializeToString() == b""
    assert decode(b"") == KadMessage(MessageType.PUT_VALUE)
    explicit = bytes.fromhex("0800 1200 5000")  # type=0, key=b"", clusterLevelRaw=0
    assert decode(explicit) == KadMessage(MessageType.PUT_VALUE)
    # An empty record is present (sub-message presence), None is absent.
    assert encode(KadMessage(MessageType.GET_VALUE, record=Record())) == bytes.fromhex("08011a00")
    assert decode(bytes.fromhex("08011a00")).record == Record()
    assert decode(bytes.fromhex("0801")).record is None
    # Negative int32 is a sign-extended 10-byte varint, as protobuf writes it.
    m = KadMessage(MessageType.PING, cluster_level_raw=-1)
    assert encode(m) == to_pb(m).SerializeToString() == bytes.fromhex("080550" + "ff" * 9 + "01")


def test_last_scalar_wins_and_records_merge_like_pb() -> None:
    data = bytes.fromhex("0801 0804 12016b 12026b32 1a030a0101 1a031201ff 5001 5002")
    assert decode(data) == from_pb(pb.Message.FromString(data))
    assert decode(data) == KadMessage(
        MessageType.FIND_NODE, key=b"k2", record=Record(key=b"\x01", value=b"\xff"), cluster_level_raw=2
    )


def test_unknown_fields_are_skipped() -> None:
    m = KadMessage(MessageType.FIND_NODE, key=b"k", closer_peers=(KadPeer(b"p", (b"a",)),))
    peer = bytes.fromhex("0a0170 120161 2203736967")  # id, addr, signedRecord (4)
    extra = [
        "5a04 73656e64",  # senderRecord (11)
        "f806 01",  # field 111, varint
        "f906 0000000000000000",  # field 111, fixed64
        "fd06 00000000",  # field 111, fixed32
        "fa06 00",  # field 111, length-delimited
    ]
    data = bytes.fromhex("0804 12016b 420b") + peer + bytes.fromhex(" ".join(extra))
    assert decode(data) == m == from_pb(pb.Message.FromString(data))
    # Record.author (3) / signature (4) are dropped.
    rec = bytes.fromhex("1a0c 0a016b 1a0161 220173 120176")
    assert decode(rec).record == Record(key=b"k", value=b"v")


def test_caps_at_the_limit_are_accepted() -> None:
    p = KadPeer(b"i" * MAX_PEER_ID_LEN, tuple(bytes([i]) for i in range(MAX_ADDRS_PER_PEER)))
    m = KadMessage(
        MessageType.GET_PROVIDERS,
        closer_peers=(p,) * MAX_CLOSER_PEERS,
        provider_peers=(p,) * MAX_PROVIDER_PEERS,
    )
    assert decode(to_pb(m).SerializeToString()) == m
    assert encode(m) == to_pb(m).SerializeToString()


def test_size_limit_exact() -> None:
    at = KadMessage(MessageType.PUT_VALUE, key=b"x" * (MAX_MESSAGE_SIZE - 4))  # tag + 3-byte len
    data = to_pb(at).SerializeToString()
    assert len(data) == MAX_MESSAGE_SIZE and encode(at) == data and decode(data) == at
    over = KadMessage(MessageType.PUT_VALUE, key=b"x" * (MAX_MESSAGE_SIZE - 3))
    with pytest.raises(KadDecodeError, match="bytes >"):
        decode(to_pb(over).SerializeToString())
    with pytest.raises(ValueError):
        encode(over)


# ------------------------------------------------------------ malformed input

OVER_CAP = {
    "too many closer peers": KadMessage(MessageType.FIND_NODE, closer_peers=(KadPeer(b"p"),) * (MAX_CLOSER_PEERS + 1)),
    "too many provider peers": KadMessage(
        MessageType.GET_PROVIDERS, provider_peers=(KadPeer(b"p"),) * (MAX_PROVIDER_PEERS + 1)
    ),
    "too many addrs": KadMessage(
        MessageType.FIND_NODE, closer_peers=(KadPeer(b"p", (b"a",) * (MAX_ADDRS_PER_PEER + 1)),)
    ),
    "peer id too long": KadMessage(MessageType.FIND_NODE, provider_peers=(KadPeer(b"p" * (MAX_PEER_ID_LEN + 1)),)),
}

MALFORMED = {
    "oversize": b"\x12\x83\x80\x04" + b"x" * (MAX_MESSAGE_SIZE - 3),
    "truncated tag varint": b"\x80",
    "truncated value varint": b"\x08",
    "truncated value varint 2": b"\x08\x80",
    "truncated length": b"\x12",
    "varint over 10 bytes": b"\x08" + b"\x80" * 10 + b"\x01",
    "varint over 64 bits": b"\x08" + b"\xff" * 9 + b"\x02",
    "length past end": b"\x12\x05ab",
    "truncated fixed64": b"\xf9\x06" + bytes(7),
    "truncated fixed32": b"\xfd\x06" + bytes(3),
    "field number 0": b"\x00\x00",
    "tag varint over 5 bytes": bytes.fromhex("888080808000 04"),
    "tag above 32 bits": bytes.fromhex("8880808080200004"),
    "wire type 3 (group)": b"\xfb\x06\xfc\x06",
    "wire type 4": b"\xfc\x06",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "type as length-delimited": b"\x0a\x00",
    "type as fixed32": b"\x0d\x04\x00\x00\x00",
    "key as varint": b"\x10\x01",
    "record as varint": b"\x18\x01",
    "closer peer as varint": b"\x40\x01",
    "provider peer as fixed64": b"\x49" + bytes(8),
    "clusterLevelRaw as bytes": b"\x52\x00",
    "unknown type 6": b"\x08\x06",
    "unknown type -1": b"\x08" + b"\xff" * 9 + b"\x01",
    "unknown connection 4": b"\x42\x02\x18\x04",
    "peer id as varint": b"\x42\x02\x08\x01",
    "peer addr as varint": b"\x42\x02\x10\x01",
    "connection as bytes": b"\x42\x02\x1a\x00",
    "record key as varint": b"\x1a\x02\x08\x01",
    "record timeReceived as varint": b"\x1a\x02\x28\x01",
    "record timeReceived bad utf8": b"\x1a\x03\x2a\x01\xff",
    "nested length past sub-message end": b"\x42\x02\x0a\x05" + b"abcde",
    "nested truncated varint": b"\x42\x01\x18",
    "nested bad wire type": b"\x1a\x01\x0f",
    **{k: to_pb(v).SerializeToString() for k, v in OVER_CAP.items()},
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_raises(name: str) -> None:
    with pytest.raises(KadDecodeError):
        decode(MALFORMED[name])


@pytest.mark.parametrize("name", sorted(OVER_CAP))
def test_encode_refuses_over_caps(name: str) -> None:
    with pytest.raises(ValueError):
        encode(OVER_CAP[name])


@pytest.mark.parametrize(
    "bad",
    [
        KadMessage(7),  # type: ignore[arg-type]
        KadMessage(MessageType.PING, cluster_level_raw=2**31),
        KadMessage(MessageType.PING, closer_peers=(KadPeer(b"p", connection=9),)),  # type: ignore[arg-type]
        KadMessage(MessageType.PING, record=Record(time_received="\udc80")),
    ],
)
def test_encode_rejects_invalid(bad: KadMessage) -> None:
    with pytest.raises(ValueError):
        encode(bad)


def test_kad_decode_error_is_value_error() -> None:
    assert issubclass(KadDecodeError, ValueError) and KadDecodeError.__doc__


def _check(data: bytes) -> KadMessage | None:
    """decode must succeed or raise KadDecodeError, never anything else."""
    try:
        return decode(data)
    except KadDecodeError:
        return None


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_every_truncation_decodes_or_raises(m: KadMessage) -> None:
    data = encode(m)
    for i in range(len(data)):
        _check(data[:i])


def test_vector_truncations_decode_or_raise() -> None:
    for v in json.loads(VECTORS.read_text()):
        data = bytes.fromhex(v["hex"])
        for i in range(len(data)):
            _check(data[:i])


def _agrees_with_pb(data: bytes) -> None:
    """If we accept bytes, protobuf must accept them too, with the same content."""
    ours = _check(data)
    if ours is not None:
        try:
            theirs = pb.Message.FromString(data)
        except DecodeError:  # pragma: no cover - would be a bug
            pytest.fail(f"we accept what protobuf rejects: {data.hex()}")
        assert from_pb(theirs) == ours


@pytest.mark.parametrize(
    "hexdata",
    [
        "8880808000 04",  # 5-byte (non-canonical) tag: longest allowed
        "f8ffffff0f00",  # largest field number, unknown, skipped
        "12 80808080808080808000",  # 10-byte length varint of 0
        "420b18 81808080808080808000",  # 10-byte connection varint of 1
        "088480808010",  # type 2**32 + 4: int32 truncation gives FIND_NODE
        "5080808080f0ffffffff01",  # clusterLevelRaw -2**31
    ],
)
def test_lenient_edges_agree_with_pb(hexdata: str) -> None:
    assert _check(bytes.fromhex(hexdata)) is not None
    _agrees_with_pb(bytes.fromhex(hexdata))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    _agrees_with_pb(data)


@settings(max_examples=500)
@given(messages, st.data())
def test_mutated_messages(m: KadMessage, data: st.DataObject) -> None:
    buf = bytearray(encode(m))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, len(buf)))
        if op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=3))
        elif buf and i < len(buf):
            if op == "flip":
                buf[i] ^= data.draw(st.integers(1, 255))
            else:
                del buf[i]
    _agrees_with_pb(bytes(buf))


# ------------------------------------------------------------ varints


def _pb_uint64(n: int) -> bytes:
    """Varint bytes of n as written by protobuf (uint64 field 4 of UninterpretedOption)."""
    raw = descriptor_pb2.UninterpretedOption(positive_int_value=n).SerializeToString()
    return raw[1:] if n else b"\x00"


@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=3))
def test_varint_matches_protobuf_and_round_trips(n: int, prefix: bytes) -> None:
    enc = varint_encode(n)
    assert enc == _pb_uint64(n)
    assert varint_decode(prefix + enc + b"\x01", len(prefix)) == (n, len(prefix) + len(enc))


def test_varint_edges() -> None:
    assert varint_decode(b"\x80\x00") == (0, 2)  # non-canonical but valid
    assert varint_decode(b"\xff" * 9 + b"\x01") == (2**64 - 1, 10)
    for bad in [b"", b"\x80", b"\x80" * 10 + b"\x00", b"\xff" * 9 + b"\x02"]:
        with pytest.raises(KadDecodeError):
            varint_decode(bad)
    with pytest.raises(KadDecodeError):
        varint_decode(b"\x01", 1)
    with pytest.raises(KadDecodeError):
        varint_decode(b"\x01", -1)
    for bad_n in [-1, 2**64]:
        with pytest.raises(ValueError):
            varint_encode(bad_n)


# ------------------------------------------------------------ test vectors


def _vector_message(m: dict[str, Any]) -> KadMessage:
    def peer(p: dict[str, Any]) -> KadPeer:
        pid = bytes.fromhex(p["id"])
        assert ID(pid).to_base58() == p["peer_id"]
        for a in p["addrs"]:
            assert multiaddr.Multiaddr(a["multiaddr"]).to_bytes().hex() == a["hex"]
        addrs = tuple(bytes.fromhex(a["hex"]) for a in p["addrs"])
        return KadPeer(pid, addrs, ConnectionType[p["connection"]])

    r = m["record"]
    return KadMessage(
        type=MessageType[m["type"]],
        key=bytes.fromhex(m["key"]),
        record=None if r is None else Record(bytes.fromhex(r["key"]), bytes.fromhex(r["value"]), r["time_received"]),
        closer_peers=tuple(peer(p) for p in m["closer_peers"]),
        provider_peers=tuple(peer(p) for p in m["provider_peers"]),
        cluster_level_raw=m["cluster_level_raw"],
    )


_VECTORS = json.loads(VECTORS.read_text())


def test_vector_file_shape() -> None:
    assert 5 <= len(_VECTORS) <= 8
    assert len({v["name"] for v in _VECTORS}) == len(_VECTORS)


@pytest.mark.parametrize("vector", _VECTORS, ids=[v["name"] for v in _VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    m = _vector_message(vector["message"])
    data = bytes.fromhex(vector["hex"])
    assert encode(m).hex() == vector["hex"]
    assert to_pb(m).SerializeToString().hex() == vector["hex"]
    assert decode(data) == m
    assert from_pb(pb.Message.FromString(data)) == m


def test_vector_file_is_up_to_date() -> None:
    script = ROOT / "scripts" / "gen_kad_vectors.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

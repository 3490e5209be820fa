"""Regenerate protocols/kad-vectors.json, the kad-dht wire test vectors.

The hex of every vector is produced by py-libp2p's generated protobuf module
(``libp2p.kad_dht.pb.kademlia_pb2``), i.e. by an encoder that is not ours, so
tests/test_kad_messages.py can check prsm_node.kad.messages against it.
Everything is deterministic (fixed key seeds), so rerunning gives the same file.

    python scripts/gen_kad_vectors.py            # rewrite the file
    python scripts/gen_kad_vectors.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import multiaddr
from _vectors import write_or_check  # noqa: E402 - scripts/ is on sys.path
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.pb import kademlia_pb2 as pb
from libp2p.peer.id import ID

OUT = Path(__file__).resolve().parent.parent / "protocols" / "kad-vectors.json"


def peer_id(seed: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([seed]) * 32).public_key)


def peer(seed: int, addrs: list[str], connection: str = "NOT_CONNECTED") -> dict[str, Any]:
    pid = peer_id(seed)
    return {
        "peer_id": pid.to_base58(),
        "id": pid.to_bytes().hex(),
        "addrs": [{"multiaddr": a, "hex": multiaddr.Multiaddr(a).to_bytes().hex()} for a in addrs],
        "connection": connection,
    }


def to_pb(message: dict[str, Any]) -> pb.Message:
    """Build the kademlia_pb2 message from a vector's human-readable fields."""

    def pb_peer(p: dict[str, Any]) -> pb.Message.Peer:
        return pb.Message.Peer(
            id=bytes.fromhex(p["id"]),
            addrs=[bytes.fromhex(a["hex"]) for a in p["addrs"]],
            connection=p["connection"],
        )

    m = pb.Message(
        type=message["type"],
        key=bytes.fromhex(message["key"]),
        clusterLevelRaw=message["cluster_level_raw"],
        closerPeers=[pb_peer(p) for p in message["closer_peers"]],
        providerPeers=[pb_peer(p) for p in message["provider_peers"]],
    )
    if message["record"] is not None:
        r = message["record"]
        m.record.CopyFrom(
            pb.Record(
                key=bytes.fromhex(r["key"]),
                value=bytes.fromhex(r["value"]),
                timeReceived=r["time_received"],
            )
        )
    return m


def message(
    type_: str,
    key: bytes = b"",
    record: dict[str, str] | None = None,
    closer: list[dict[str, Any]] | None = None,
    providers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "type": type_,
        "key": key.hex(),
        "record": record,
        "closer_peers": closer or [],
        "provider_peers": providers or [],
        "cluster_level_raw": 0,
    }


def vectors() -> list[dict[str, Any]]:
    target = peer_id(1).to_bytes()
    # CIDv1 raw of sha2-256("prsm"): 0x01 0x55 + multihash.
    cid = bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(b"prsm").digest()
    b = peer(2, ["/ip4/127.0.0.1/tcp/4001"], "CONNECTED")
    c = peer(3, ["/ip4/127.0.0.1/tcp/4002"], "CAN_CONNECT")
    prov = peer(4, ["/ip4/10.0.0.7/tcp/4001", "/ip6/::1/tcp/4001", "/dns4/node.example/tcp/4001"])
    record = {
        "key": b"/prsm/demo".hex(),
        "value": b"hello prsm".hex(),
        "time_received": "2024-01-02T03:04:05.000000006Z",
    }
    cases = [
        ("find_node_request", message("FIND_NODE", target)),
        ("find_node_response", message("FIND_NODE", target, closer=[b, c])),
        ("ping", message("PING")),
        ("get_providers_response", message("GET_PROVIDERS", cid, closer=[c], providers=[prov])),
        ("add_provider_request", message("ADD_PROVIDER", cid, providers=[prov])),
        ("put_value_request", message("PUT_VALUE", b"/prsm/demo", record=record)),
        ("get_value_response", message("GET_VALUE", b"/prsm/demo", record=record, closer=[b])),
    ]
    return [{"name": name, "message": m, "hex": to_pb(m).SerializeToString().hex()} for name, m in cases]


def main() -> int:
    return write_or_check(OUT, json.dumps(vectors(), indent=2) + "\n", None)


if __name__ == "__main__":
    sys.exit(main())

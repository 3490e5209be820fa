"""Regenerate protocols/pbft-vectors.json, the PBFT (`/prsm/pbft/1.0.0`) test vectors.

Every byte string is built here straight from protocols/pbft.md with plain msgpack and
pynacl calls, not with prsm_node.consensus.messages, so tests/test_pbft_vectors.py checks the
implementation against the document. Keys come from fixed seeds and Ed25519 is
deterministic, so rerunning gives the same file.

    python scripts/gen_pbft_vectors.py            # rewrite the file
    python scripts/gen_pbft_vectors.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "protocols" / "pbft-vectors.json"

CHAIN = "prsm-vectors-1"
DOMAIN = "prsm-pbft-v1"
NAMES = ["alice", "bob", "carol", "dave"]
SEEDS = {name: bytes([i + 1]) * 32 for i, name in enumerate(NAMES)}
KEYS = {name: nacl.signing.SigningKey(seed) for name, seed in SEEDS.items()}
PK = {name: bytes(k.verify_key) for name, k in KEYS.items()}
ZERO = bytes(32)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def batch_digest(batch: list[bytes]) -> bytes:
    return hashlib.sha256(pack(["prsm-pbft-batch-v1", CHAIN, batch])).digest()


def sig(name: str, kind: int, fields: list[Any]) -> bytes:
    return KEYS[name].sign(pack([DOMAIN, CHAIN, kind, PK[name], *fields])).signature


def message(label: str, name: str, kind: int, signed: list[Any], unsigned: list[Any] | None = None) -> dict[str, Any]:
    """A vector: the signing payload, the signature and the wire bytes of one message."""
    payload = pack([DOMAIN, CHAIN, kind, PK[name], *signed])
    signature = KEYS[name].sign(payload).signature
    wire = pack([kind, PK[name], *signed, *(unsigned or []), signature])
    return {
        "name": label,
        "kind": kind,
        "sender": name,
        "signing_payload": payload.hex(),
        "signature": signature.hex(),
        "hex": wire.hex(),
        "hash": hashlib.sha256(wire).hexdigest(),
        "_wire": [kind, PK[name], *signed, *(unsigned or []), signature],
    }


def main() -> int:
    batch = [b"tx-one", b"tx-two"]
    d = batch_digest(batch)
    null = batch_digest([])
    state = hashlib.sha256(b"state after 4").digest()

    def sigs(kind: int, fields: list[Any], who: list[str]) -> list[list[bytes]]:
        return [[PK[n], sig(n, kind, fields)] for n in sorted(who, key=lambda n: PK[n])]

    msgs = [
        message("request", "bob", 1, [b"an opaque signed ledger tx"]),
        message("pre-prepare", "alice", 2, [0, 1, d], [batch]),
        message("pre-prepare-null", "alice", 2, [0, 2, null], [[]]),
        message("prepare", "bob", 3, [0, 1, d]),
        message("commit", "carol", 4, [0, 1, d]),
        message("checkpoint", "dave", 5, [4, state]),
        message("status", "carol", 8, [1, 0, 4, 5]),
    ]
    cp_cert = sigs(5, [4, state], ["alice", "bob", "carol"])
    prepared = [0, 5, d, sig("alice", 2, [0, 5, d]), sigs(3, [0, 5, d], ["bob", "carol"])]
    vc_bob = message("view-change", "bob", 6, [1, 4, state, cp_cert, [prepared]])
    vc_carol = message("view-change-genesis", "carol", 6, [1, 0, ZERO, [], []])
    vc_dave = message("view-change-dave", "dave", 6, [1, 4, state, cp_cert, []])
    msgs += [vc_bob, vc_carol]
    # NEW-VIEW for view 1 (primary bob): min_s = 4, max_s = 5, O = [(5, d)].
    o_set = [[5, d, sig("bob", 2, [1, 5, d])]]
    vcs = sorted([vc_bob, vc_carol, vc_dave], key=lambda m: m["_wire"][1])
    msgs.append(message("new-view", "bob", 7, [1, [m["_wire"] for m in vcs], o_set]))
    cert = [0, 1, d, sigs(4, [0, 1, d], ["alice", "bob", "carol"])]
    msgs.append(message("committed", "dave", 9, [batch, cert]))
    for m in msgs:
        del m["_wire"]

    commit_vec = msgs[4]
    invalid = [
        {"name": "unknown kind", "hex": pack([10, PK["bob"], 0, bytes(64)]).hex(), "error": "ConsensusDecodeError"},
        {"name": "reserved kind 0", "hex": pack([0, PK["bob"], bytes(64)]).hex(), "error": "ConsensusDecodeError"},
        {
            "name": "prepare with a uint16 view",
            "hex": (bytes([0x96, 0x03, 0xC4, 0x20]) + PK["bob"] + bytes([0xCD, 0, 0, 1, 0xC4, 0x20]) + d
                    + bytes([0xC4, 0x40]) + bytes(64)).hex(),
            "error": "ConsensusDecodeError",
        },
        {"name": "prepare with a short digest", "hex": pack([3, PK["bob"], 0, 1, d[:31], bytes(64)]).hex(),
         "error": "ConsensusDecodeError"},
        {"name": "status with has_view 2", "hex": pack([8, PK["bob"], 0, 2, 0, 0, bytes(64)]).hex(),
         "error": "ConsensusDecodeError"},
        {"name": "commit with trailing bytes", "hex": commit_vec["hex"] + "00", "error": "ConsensusDecodeError"},
        {"name": "a map", "hex": pack({"kind": 3}).hex(), "error": "ConsensusDecodeError"},
        {"name": "new-view carrying a prepare",
         "hex": pack([7, PK["bob"], 1, [[3, PK["bob"], 0, 1, d, bytes(64)]], [], bytes(64)]).hex(),
         "error": "ConsensusDecodeError"},
    ]
    doc = {
        "description": "PBFT /prsm/pbft/1.0.0 test vectors (protocols/pbft.md), by scripts/gen_pbft_vectors.py",
        "chain_id": CHAIN,
        "keys": [{"name": n, "seed": SEEDS[n].hex(), "public_key": PK[n].hex()} for n in NAMES],
        "validators": [PK[n].hex() for n in NAMES],
        "digests": {
            "batch": [r.hex() for r in batch],
            "batch_digest": d.hex(),
            "null_batch_digest": null.hex(),
            "request_digest": hashlib.sha256(batch[0]).hexdigest(),
        },
        "messages": msgs,
        "invalid": invalid,
    }
    text = json.dumps(doc, indent=2) + "\n"
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_pbft_vectors.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

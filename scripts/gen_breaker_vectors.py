"""Regenerate protocols/breaker-vectors.json, the circuit-breaker test vectors.

Every byte here is built straight from protocols/breaker.md with plain msgpack and pynacl
calls, not with prsm_node.breaker, and the tally scenario's expected states follow the spec's
rule, written out again below, so tests/test_breaker_vectors.py checks the implementation
against the document. Keys come from fixed seeds and Ed25519 signatures are deterministic, so
rerunning gives the same file.

    python scripts/gen_breaker_vectors.py            # rewrite the file
    python scripts/gen_breaker_vectors.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
from _vectors import write_or_check  # noqa: E402 - scripts/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "protocols" / "breaker-vectors.json"

CHAIN = "prsm-vectors-1"
DOMAIN = "prsm-breaker-vote-v1"
NOW = 1_800_000_000_000
KEYS = {name: nacl.signing.SigningKey(bytes([i + 1]) * 32) for i, name in enumerate(["alice", "bob", "carol", "dave"])}
ACCT = {name: bytes(k.verify_key) for name, k in KEYS.items()}
MODEL_A = hashlib.sha256(b"model a").digest()
MODEL_B = hashlib.sha256(b"model b").digest()
HALT, RESUME = 1, 2


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def vote(name: str, voter: str, model: bytes, action: int, epoch: int, ts: int, reason: str) -> dict[str, Any]:
    fields = [CHAIN, ACCT[voter], model, action, epoch, ts, reason]
    payload = pack([DOMAIN, *fields])
    sig = KEYS[voter].sign(payload).signature
    full = pack([*fields, sig])
    return {
        "name": name,
        "fields": {
            "chain_id": CHAIN,
            "voter": ACCT[voter].hex(),
            "model": model.hex(),
            "action": action,
            "epoch": epoch,
            "timestamp_ms": ts,
            "reason": reason,
        },
        "signing_payload": payload.hex(),
        "signature": sig.hex(),
        "hex": full.hex(),
        "vote_id": hashlib.sha256(full).hexdigest(),
        "_wire": [*fields, sig],
    }


def build() -> dict[str, Any]:
    votes = [
        vote("alice_halt_a", "alice", MODEL_A, HALT, 1, NOW, "emits unsafe instructions"),
        vote("bob_halt_a", "bob", MODEL_A, HALT, 7, NOW + 1000, ""),
        vote("alice_resume_a", "alice", MODEL_A, RESUME, 2, NOW + 2000, "patched upstream"),
        vote("carol_resume_a", "carol", MODEL_A, RESUME, 1, NOW + 3000, "ok"),
        vote("dave_resume_a", "dave", MODEL_A, RESUME, 1, NOW + 4000, "ok"),
        vote("bob_resume_a", "bob", MODEL_A, RESUME, 8, NOW + 5000, "ok"),
        vote("carol_halt_b_unicode", "carol", MODEL_B, HALT, 2**64 - 1, 2**64 - 1, "é" * 140),
    ]
    by = {v["name"]: v for v in votes}
    w = by["alice_halt_a"]["_wire"]
    # alice_halt_a with its epoch (1) written as a uint64 (0xcf + 8 bytes): not the shortest form
    non_minimal_epoch = b"\x98" + b"".join(pack(x) for x in w[:4]) + b"\xcf" + (1).to_bytes(8, "big")
    non_minimal_epoch += b"".join(pack(x) for x in w[5:])
    invalid_votes = [
        {"name": "trailing_byte", "hex": (pack(w) + b"\x00").hex()},
        {"name": "array16_header", "hex": (b"\xdc\x00\x08" + pack(w)[1:]).hex()},
        {"name": "seven_fields", "hex": pack(w[:7]).hex()},
        {"name": "action_0", "hex": pack([*w[:3], 0, *w[4:]]).hex()},
        {"name": "action_bool", "hex": pack([*w[:3], True, *w[4:]]).hex()},
        {"name": "epoch_uint64_holding_1", "hex": non_minimal_epoch.hex()},
        {"name": "reason_281_bytes", "hex": pack([*w[:6], "x" * 281, w[7]]).hex()},
        {"name": "voter_31_bytes", "hex": pack([w[0], w[1][:31], *w[2:]]).hex()},
        {"name": "chain_id_empty", "hex": pack(["", *w[1:]]).hex()},
        {"name": "chain_id_as_bin", "hex": pack([CHAIN.encode(), *w[1:]]).hex()},
        {"name": "signature_63_bytes", "hex": pack([*w[:7], w[7][:63]]).hex()},
        {"name": "map", "hex": pack({"chain_id": CHAIN}).hex()},
    ]
    # check_vote: each with its context; "error" is the code, null when accepted
    base = {
        "chain_id": CHAIN,
        "now_ms": NOW + 1000,
        "max_age_ms": 600000,
        "max_future_ms": 30000,
        "stake": 100,
        "last_epoch": None,
    }
    forged = pack([*w[:6], "edited", w[7]])
    checks = [
        {"name": "accepted", "vote": by["alice_halt_a"]["hex"], **base, "error": None},
        {
            "name": "wrong_chain",
            "vote": by["alice_halt_a"]["hex"],
            **base,
            "chain_id": "prsm-other",
            "error": "wrong_chain",
        },
        {"name": "bad_signature", "vote": forged.hex(), **base, "error": "bad_signature"},
        {"name": "unstaked", "vote": by["alice_halt_a"]["hex"], **base, "stake": 0, "error": "unstaked"},
        {"name": "too_old", "vote": by["alice_halt_a"]["hex"], **base, "now_ms": NOW + 600001, "error": "stale"},
        {"name": "oldest_accepted", "vote": by["alice_halt_a"]["hex"], **base, "now_ms": NOW + 600000, "error": None},
        {
            "name": "catch_up_no_age_limit",
            "vote": by["alice_halt_a"]["hex"],
            **base,
            "now_ms": NOW + 10**9,
            "max_age_ms": None,
            "error": None,
        },
        {"name": "from_the_future", "vote": by["alice_halt_a"]["hex"], **base, "now_ms": NOW - 30001, "error": "stale"},
        {
            "name": "replayed_same_epoch",
            "vote": by["alice_halt_a"]["hex"],
            **base,
            "last_epoch": 1,
            "error": "replayed",
        },
        {"name": "newer_epoch", "vote": by["alice_resume_a"]["hex"], **base, "last_epoch": 1, "error": None},
        {
            "name": "wrong_chain_before_signature",
            "vote": pack(["prsm-other", *w[1:6], "edited", w[7]]).hex(),
            **base,
            "error": "wrong_chain",
        },
    ]
    # tally: total stake 300 (alice 90, bob 10, carol 100, dave 100), thresholds 1/3 and 2/3
    stakes = {"alice": 90, "bob": 10, "carol": 100, "dave": 100}
    sequence = ["alice_halt_a", "bob_halt_a", "alice_resume_a", "carol_resume_a", "dave_resume_a", "bob_resume_a"]
    steps = []
    latest: dict[str, dict[str, Any]] = {}
    state = "running"
    total = sum(stakes.values())
    for name in sequence:
        v = by[name]
        voter = next(n for n, a in ACCT.items() if a.hex() == v["fields"]["voter"])
        latest[voter] = v
        halt = sum(stakes[n] for n, x in latest.items() if x["fields"]["action"] == HALT)
        resume = sum(stakes[n] for n, x in latest.items() if x["fields"]["action"] == RESUME)
        if 3 * resume >= 2 * total:
            state = "running"
        elif 3 * halt >= 1 * total:
            state = "halted"
        steps.append({"vote": name, "halt_stake": halt, "resume_stake": resume, "state": state})
    tally = {
        "halt_threshold": {"numerator": 1, "denominator": 3},
        "resume_threshold": {"numerator": 2, "denominator": 3},
        "stakes": {ACCT[n].hex(): s for n, s in stakes.items()},
        "total_stake": total,
        "model": MODEL_A.hex(),
        "steps": steps,
    }
    a0, a1 = by["alice_halt_a"]["_wire"], by["bob_halt_a"]["_wire"]
    cursor = MODEL_A + ACCT["bob"] + (7).to_bytes(8, "big")
    messages = [
        {"name": "get_votes_all", "hex": pack([1, b"", 0, b""]).hex()},
        {"name": "get_votes_model_cursor", "hex": pack([1, MODEL_A, NOW + 1000, cursor]).hex()},
        {"name": "votes_two_more", "hex": pack([2, [pack(a0), pack(a1)], 1]).hex()},
        {"name": "votes_empty", "hex": pack([2, [], 0]).hex()},
        {"name": "error_busy", "hex": pack([3, 3, "try later"]).hex()},
        {"name": "get_digest", "hex": pack([4, NOW]).hex()},
        {"name": "digest", "hex": pack([5, NOW, spec_digest([a0, a1], NOW + 10**6)]).hex()},
        {"name": "get_buckets_first", "hex": pack([6, bucket_set([MODEL_A[0]]), NOW, b""]).hex()},
        {"name": "get_buckets_after", "hex": pack([6, bucket_set([0, 255]), NOW, MODEL_A + ACCT["bob"]]).hex()},
    ]
    invalid_messages = [
        {"name": "unknown_type", "hex": pack([9]).hex()},
        {"name": "get_votes_model_31_bytes", "hex": pack([1, MODEL_A[:31], 0, b""]).hex()},
        {"name": "get_votes_cursor_71_bytes", "hex": pack([1, b"", 0, cursor[:71]]).hex()},
        {"name": "votes_more_2", "hex": pack([2, [], 2]).hex()},
        {"name": "votes_bad_vote", "hex": pack([2, [pack(a0) + b"\x00"], 0]).hex()},
        {"name": "error_unknown_code", "hex": pack([3, 99, ""]).hex()},
        {"name": "digest_short", "hex": pack([5, NOW, bytes(3071)]).hex()},
        {"name": "get_buckets_31_bytes", "hex": pack([6, bytes(31), NOW, b""]).hex()},
        {"name": "get_buckets_cursor_72_bytes", "hex": pack([6, bytes(32), NOW, cursor]).hex()},
        {"name": "get_digest_negative", "hex": pack([4, -1]).hex()},
    ]
    digest_votes = [a0, a1]
    digest = {
        "votes": [pack(w).hex() for w in digest_votes],
        "before_ms": NOW + 10**6,
        "digest": spec_digest(digest_votes, NOW + 10**6).hex(),
        "before_ms_excluding_all": 0,
        "digest_excluding_all": spec_digest(digest_votes, 0).hex(),
    }
    for v in votes:
        del v["_wire"]
    return {
        "chain_id": CHAIN,
        "keys": {n: {"seed": (bytes([i + 1]) * 32).hex(), "public_key": ACCT[n].hex()} for i, n in enumerate(KEYS)},
        "votes": votes,
        "invalid_votes": invalid_votes,
        "checks": checks,
        "tally": tally,
        "messages": messages,
        "invalid_messages": invalid_messages,
        "digest": digest,
    }


def spec_digest(wires: list[list[Any]], before_ms: int) -> bytes:
    """A DIGEST as breaker.md, "Anti-entropy", defines it, from votes' wire fields."""
    counts, xors = [0] * 256, [0] * 256
    for w in wires:
        model, voter, epoch, ts = w[2], w[1], w[4], w[5]
        if ts < before_ms:
            counts[model[0]] += 1
            key = hashlib.sha256(model + voter + epoch.to_bytes(8, "big")).digest()[:8]
            xors[model[0]] ^= int.from_bytes(key, "big")
    return b"".join(c.to_bytes(4, "big") + x.to_bytes(8, "big") for c, x in zip(counts, xors, strict=True))


def bucket_set(buckets: list[int]) -> bytes:
    out = bytearray(32)
    for b in buckets:
        out[b >> 3] |= 1 << (b & 7)
    return bytes(out)


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    return write_or_check(OUT, render(), None)


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate protocols/ledger-vectors.json, the FTNS ledger test vectors.

The bytes of every vector are built here straight from protocols/ledger.md with plain msgpack
and pynacl calls, not with prsm_node.ledger.codec, and the final state hash is recomputed
here from the spec formula, so tests/test_ledger_vectors.py checks the implementation against
the spec. Only the state sequence is run through prsm_node.ledger.LedgerState (to get each
step's outcome). Keys come from fixed seeds and Ed25519 signatures are deterministic, so
rerunning gives the same file.

The block and certificate vectors follow "Blocks" and "Commit certificates": header, tx root,
block hash, commit payload and certificate are all packed here from the spec; LedgerState
only supplies the accounts after the block, whose state hash is again the spec formula.

    python scripts/gen_ledger_vectors.py            # rewrite the file
    python scripts/gen_ledger_vectors.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import base58
import msgpack
import nacl.signing

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "protocols" / "ledger-vectors.json"
sys.path.insert(0, str(ROOT))

from _vectors import write_or_check  # noqa: E402 - scripts/ is on sys.path

from prsm_node.genesis import Genesis, Validator  # noqa: E402
from prsm_node.ledger import LedgerState, TxRejected, decode_tx  # noqa: E402

CHAIN = "prsm-vectors-1"
FTNS = 10**18
KEYS = {name: nacl.signing.SigningKey(bytes([i + 1]) * 32) for i, name in enumerate(["alice", "bob", "carol", "dave"])}
ACCT = {name: bytes(k.verify_key) for name, k in KEYS.items()}
ACCT_NAME = {v: k for k, v in ACCT.items()}


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def amount(x: int) -> bytes:
    return x.to_bytes(16, "big")


def receipt(payer: str, payee: str, rid: bytes, value: int) -> dict[str, Any]:
    fields = [rid, ACCT[payer], ACCT[payee], amount(value), CHAIN]
    payload = pack(["prsm-receipt-v1", *fields])
    sig = KEYS[payer].sign(payload).signature
    return {
        "fields": {
            "receipt_id": rid.hex(),
            "payer": ACCT[payer].hex(),
            "payee": ACCT[payee].hex(),
            "amount": str(value),
            "chain_id": CHAIN,
        },
        "signing_payload": payload.hex(),
        "signature": sig.hex(),
        "hex": pack([*fields, sig]).hex(),
        "_wire": [*fields, sig],
    }


def tx(name: str, sender: str, nonce: int, fee: int, body: dict[str, Any], wire_body: list[Any]) -> dict[str, Any]:
    payload = pack(["prsm-tx-v1", CHAIN, ACCT[sender], nonce, amount(fee), wire_body])
    sig = KEYS[sender].sign(payload).signature
    full = pack([CHAIN, ACCT[sender], nonce, amount(fee), wire_body, sig])
    return {
        "name": name,
        "fields": {"chain_id": CHAIN, "sender": ACCT[sender].hex(), "nonce": nonce, "fee": str(fee), "body": body},
        "signing_payload": payload.hex(),
        "signature": sig.hex(),
        "hex": full.hex(),
        "hash": hashlib.sha256(full).hexdigest(),
    }


def transactions() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    r1 = receipt("alice", "bob", hashlib.sha256(b"job-1").digest(), 3 * FTNS // 2)
    r2 = receipt("carol", "bob", hashlib.sha256(b"job-2").digest(), 1)
    fee = FTNS // 1000
    txs = [
        tx(
            "transfer",
            "alice",
            0,
            fee,
            {"kind": "transfer", "to": ACCT["bob"].hex(), "amount": str(10 * FTNS)},
            [1, ACCT["bob"], amount(10 * FTNS)],
        ),
        tx("stake", "alice", 1, fee, {"kind": "stake", "amount": str(20 * FTNS)}, [2, amount(20 * FTNS)]),
        tx(
            "settle",
            "bob",
            0,
            fee,
            {"kind": "settle", "receipts": [r1["fields"] | {"signature": r1["signature"]}]},
            [4, [r1["_wire"]]],
        ),
        tx("unstake", "alice", 2, fee, {"kind": "unstake", "amount": str(5 * FTNS)}, [3, amount(5 * FTNS)]),
        tx(
            "settle_two_receipts",
            "bob",
            1,
            0,
            {"kind": "settle", "receipts": [r["fields"] | {"signature": r["signature"]} for r in (r1, r2)]},
            [4, [r1["_wire"], r2["_wire"]]],
        ),
    ]
    alice_vote = breaker_vote("alice", MODEL, 1, 1, "emits unsafe instructions")
    txs.append(
        tx(
            "breaker_vote",
            "dave",
            0,
            0,
            {"kind": "breaker_vote", "vote": alice_vote.hex()},
            [5, alice_vote],
        )
    )
    r1.pop("_wire")
    return txs, {"name": "receipt", **r1}


MODEL = hashlib.sha256(b"model a").digest()
VOTE_TIME_MS = 1_800_000_000_000


def breaker_vote(voter: str, model: bytes, action: int, epoch: int, reason: str) -> bytes:
    """A signed breaker vote exactly as protocols/breaker.md writes it."""
    fields = [CHAIN, ACCT[voter], model, action, epoch, VOTE_TIME_MS + epoch, reason]
    sig = KEYS[voter].sign(pack(["prsm-breaker-vote-v1", *fields])).signature
    return pack([*fields, sig])


def invalid(txs: list[dict[str, Any]]) -> list[dict[str, str]]:
    good = bytes.fromhex(txs[0]["hex"])
    transfer = msgpack.unpackb(good, raw=False)
    sig = transfer[5]

    def with_body(body: list[Any]) -> str:
        return pack([*transfer[:4], body, sig]).hex()

    nonce_u32 = good.replace(
        bytes([0xC4, 0x20]) + ACCT["alice"] + b"\x00",
        bytes([0xC4, 0x20]) + ACCT["alice"] + bytes.fromhex("ce00000000"),
        1,
    )
    return [
        {"name": "trailing_byte", "hex": (good + b"\x00").hex(), "error": "LedgerDecodeError"},
        {"name": "truncated", "hex": good[:-1].hex(), "error": "LedgerDecodeError"},
        {"name": "unknown_kind", "hex": with_body([9, amount(1)]), "error": "UnknownKind"},
        {"name": "amount_17_bytes", "hex": with_body([1, ACCT["bob"], bytes(17)]), "error": "LedgerDecodeError"},
        {"name": "amount_as_int", "hex": with_body([1, ACCT["bob"], 5]), "error": "LedgerDecodeError"},
        {"name": "nonce_non_minimal_uint32", "hex": nonce_u32.hex(), "error": "LedgerDecodeError"},
        {"name": "map_not_array", "hex": pack({"chain_id": CHAIN}).hex(), "error": "LedgerDecodeError"},
        {"name": "empty_settle", "hex": with_body([4, []]), "error": "LedgerDecodeError"},
        {"name": "breaker_vote_not_a_vote", "hex": with_body([5, pack([CHAIN])]), "error": "LedgerDecodeError"},
        {"name": "breaker_vote_as_array", "hex": with_body([5, [CHAIN]]), "error": "LedgerDecodeError"},
    ]


def account_json(a: Any) -> dict[str, Any]:
    return {
        "balance": str(a.balance),
        "nonce": a.nonce,
        "stake": str(a.stake),
        "unbonding": [[str(x), h] for x, h in a.unbonding],
    }


def spec_state_hash(
    height: int, accounts: dict[str, dict[str, Any]], settled: list[str], votes: dict[str, Any] | None = None
) -> str:
    """The state hash exactly as protocols/ledger.md defines it."""

    def term(preimage: bytes) -> int:
        return int.from_bytes(hashlib.shake_256(preimage).digest(2048), "little")

    acc = 0
    for key, a in accounts.items():
        state = pack(
            [
                amount(int(a["balance"])),
                a["nonce"],
                amount(int(a["stake"])),
                [[amount(int(x)), h] for x, h in a["unbonding"]],
            ]
        )
        acc += term(b"prsm-acct-v1" + bytes.fromhex(key) + state)
    for key in settled:
        acc += term(b"prsm-rcpt-v1" + bytes.fromhex(key))
    for key, record in (votes or {}).items():
        acc += term(b"prsm-bvote-v1" + bytes.fromhex(key) + pack([bytes.fromhex(record["vote"]), record["height"]]))
    acc %= 1 << 16384
    return hashlib.sha256(pack(["prsm-state-v1", CHAIN, height, acc.to_bytes(2048, "little")])).hexdigest()


def state_sequence(txs: list[dict[str, Any]]) -> dict[str, Any]:
    by_name = {t["name"]: t for t in txs}
    genesis = Genesis(
        chain_id=CHAIN,
        network="vectors",
        genesis_time=0,
        balances={ACCT["alice"].hex(): str(100 * FTNS), ACCT["bob"].hex(): str(50 * FTNS), ACCT["carol"].hex(): "7"},
        params={"unbonding_blocks": 2, "min_fee": "0", "block_reward": str(2 * FTNS)},
    )
    plan: list[tuple[str, str, int]] = [
        ("transfer", "carol", 1),
        ("stake", "carol", 1),
        ("settle", "carol", 1),
        ("end_block", "carol", 1),
        ("unstake", "dave", 2),
        ("transfer", "dave", 2),  # replay: BadNonce
        ("settle_two_receipts", "dave", 2),  # r1 again: ReceiptAlreadySettled
        ("end_block", "dave", 2),
        ("end_block", "carol", 3),
        ("end_block", "carol", 4),  # releases alice's unstake
    ]
    state = LedgerState.from_genesis(genesis)
    steps = []
    for what, proposer, height in plan:
        step: dict[str, Any] = {"height": height, "proposer": ACCT[proposer].hex()}
        if what == "end_block":
            state.end_block(height, proposer=ACCT[proposer])
            step |= {"end_block": True, "result": "ok"}
        else:
            try:
                state.apply(decode_tx(bytes.fromhex(by_name[what]["hex"])), proposer=ACCT[proposer], height=height)
                result = "ok"
            except TxRejected as exc:
                result = type(exc).__name__
            step |= {"tx": what, "result": result}
        step["state_hash"] = state.state_hash().hex()
        steps.append(step)
    accounts = {k.hex(): account_json(a) for k, a in state.accounts()}
    settled = [k.hex() for k in state.settled_receipts()]
    final = spec_state_hash(state.height, accounts, settled)
    if final != state.state_hash().hex():
        raise SystemExit("prsm_node.ledger's state hash disagrees with the spec formula")
    return {
        "genesis": genesis.to_json(),
        "steps": steps,
        "height": state.height,
        "total_supply": str(state.total_supply),
        "accounts": accounts,
        "settled": settled,
        "state_hash": final,
    }


def breaker_sequence() -> dict[str, Any]:
    """Breaker votes recorded by a validator (dave): accepted once, then stale, unstaked."""
    genesis = Genesis(
        chain_id=CHAIN,
        network="vectors",
        genesis_time=0,
        balances={ACCT["alice"].hex(): str(100 * FTNS), ACCT["dave"].hex(): str(FTNS)},
        params={"unbonding_blocks": 2},
    )
    v1 = breaker_vote("alice", MODEL, 1, 1, "emits unsafe instructions")
    v2 = breaker_vote("alice", MODEL, 2, 2, "fixed upstream")
    vb = breaker_vote("bob", MODEL, 1, 1, "bob has no stake")
    txs = {
        "alice_stakes": tx("alice_stakes", "alice", 0, 0, {"kind": "stake", "amount": str(FTNS)}, [2, amount(FTNS)]),
        "record_v1": tx("record_v1", "dave", 0, 0, {"kind": "breaker_vote", "vote": v1.hex()}, [5, v1]),
        "record_v1_again": tx("record_v1_again", "dave", 1, 0, {"kind": "breaker_vote", "vote": v1.hex()}, [5, v1]),
        "record_unstaked": tx("record_unstaked", "dave", 1, 0, {"kind": "breaker_vote", "vote": vb.hex()}, [5, vb]),
        "record_v2": tx("record_v2", "dave", 1, 0, {"kind": "breaker_vote", "vote": v2.hex()}, [5, v2]),
    }
    plan: list[tuple[str, str, int]] = [
        ("record_v1", "dave", 1),  # alice has no stake yet: InsufficientStake
        ("alice_stakes", "dave", 1),
        ("record_v1", "dave", 1),
        ("record_v1_again", "dave", 1),  # StaleVote
        ("record_unstaked", "dave", 1),  # InsufficientStake
        ("end_block", "dave", 1),
        ("record_v1_again", "dave", 2),  # StaleVote
        ("record_v2", "dave", 2),
        ("end_block", "dave", 2),
    ]
    state = LedgerState.from_genesis(genesis)
    steps = []
    for what, proposer, height in plan:
        step: dict[str, Any] = {"height": height, "proposer": ACCT[proposer].hex()}
        if what == "end_block":
            state.end_block(height, proposer=ACCT[proposer])
            step |= {"end_block": True, "result": "ok"}
        else:
            try:
                state.apply(decode_tx(bytes.fromhex(txs[what]["hex"])), proposer=ACCT[proposer], height=height)
                result = "ok"
            except TxRejected as exc:
                result = type(exc).__name__
            step |= {"tx": what, "result": result}
        step["state_hash"] = state.state_hash().hex()
        steps.append(step)
    accounts = {k.hex(): account_json(a) for k, a in state.accounts()}
    votes = {
        (r.vote.model + r.vote.voter).hex(): {"vote": (v2 if r.vote.epoch == 2 else v1).hex(), "height": r.height}
        for r in state.vote_records()
    }
    final = spec_state_hash(state.height, accounts, [], votes)
    if final != state.state_hash().hex():
        raise SystemExit("prsm_node.ledger's state hash with breaker votes disagrees with the spec formula")
    return {
        "genesis": genesis.to_json(),
        "transactions": list(txs.values()),
        "steps": steps,
        "height": state.height,
        "accounts": accounts,
        "votes": votes,
        "state_hash": final,
    }


# ------------------------------------------------------------ blocks and certificates

BLOCK_TIME_MS = 1_700_000_000_000
ZERO_HASH = bytes(32)


def peer_id(name: str) -> str:
    """The libp2p peer id of a key: base58 of the identity multihash of its protobuf PublicKey."""
    public_key = bytes([0x08, 0x01, 0x12, 0x20]) + ACCT[name]
    return base58.b58encode(bytes([0x00, len(public_key)]) + public_key).decode()


def block_genesis() -> Genesis:
    """The genesis of the block vector: dave is the single (development) validator."""
    return Genesis(
        chain_id=CHAIN,
        network="vectors",
        genesis_time=0,
        validators=[Validator(account=ACCT["dave"].hex(), peer_id=peer_id("dave"))],
        balances={ACCT["alice"].hex(): str(100 * FTNS), ACCT["bob"].hex(): str(50 * FTNS)},
        params={"unbonding_blocks": 2, "min_fee": "0", "block_reward": str(2 * FTNS)},
    )


def commit_payload(height: int, block_hash: bytes) -> bytes:
    return pack(["prsm-commit-v1", CHAIN, height, block_hash])


def certificate(signers: list[str], validators: list[str], height: int, block_hash: bytes) -> dict[str, Any]:
    payload = commit_payload(height, block_hash)
    pairs = sorted((ACCT[n], KEYS[n].sign(payload).signature) for n in signers)
    n = len(validators)
    return {
        "validators": [ACCT[v].hex() for v in validators],
        "quorum": n - (n - 1) // 3,
        "signers": [ACCT[s].hex() for s in sorted(signers, key=lambda s: ACCT[s])],
        "commit_payload": payload.hex(),
        "signatures": [[a.hex(), sig.hex()] for a, sig in pairs],
        "hex": pack([[a, sig] for a, sig in pairs]).hex(),
    }


def block_vectors() -> dict[str, Any]:
    """One block of two transfers on top of block_genesis(), its certificates, and defects."""
    fee = FTNS // 1000
    txs = [
        tx(
            "alice_to_bob",
            "alice",
            0,
            fee,
            {"kind": "transfer", "to": ACCT["bob"].hex(), "amount": str(10 * FTNS)},
            [1, ACCT["bob"], amount(10 * FTNS)],
        ),
        tx(
            "bob_to_carol",
            "bob",
            0,
            0,
            {"kind": "transfer", "to": ACCT["carol"].hex(), "amount": str(3 * FTNS // 2)},
            [1, ACCT["carol"], amount(3 * FTNS // 2)],
        ),
    ]
    encoded = [bytes.fromhex(t["hex"]) for t in txs]
    root = hashlib.sha256(b"prsm-txroot-v1" + b"".join(hashlib.sha256(e).digest() for e in encoded)).digest()

    # The state after the block: both txs with dave as proposer, then end_block(1).
    genesis = block_genesis()
    state = LedgerState.from_genesis(genesis)
    for e in encoded:
        state.apply(decode_tx(e), proposer=ACCT["dave"], height=1)
    state.end_block(1, proposer=ACCT["dave"])
    accounts = {k.hex(): account_json(a) for k, a in state.accounts()}
    state_hash = spec_state_hash(1, accounts, [])
    if state_hash != state.state_hash().hex():
        raise SystemExit("prsm_node.ledger's state hash after the block disagrees with the spec formula")

    fields = [CHAIN, 1, ZERO_HASH, BLOCK_TIME_MS, ACCT["dave"], root, len(encoded), bytes.fromhex(state_hash)]
    header = pack(fields)
    block_hash = hashlib.sha256(b"prsm-block-v1" + header).digest()

    def block_hex(header_fields: list[Any], body: list[bytes]) -> str:
        return pack([header_fields, body]).hex()

    def replace(i: int, value: Any) -> list[Any]:
        return [value if j == i else f for j, f in enumerate(fields)]

    non_minimal = bytes.fromhex(block_hex(fields, encoded))
    # height 1 as uint16 (cd 0001) instead of the positive fixint 01, right after the chain id
    chain_str = pack(CHAIN)
    at = 2 + len(chain_str)  # fixarray(2), fixarray(8), chain id
    assert non_minimal[at] == 0x01
    non_minimal = non_minimal[:at] + bytes.fromhex("cd0001") + non_minimal[at + 1 :]

    undecodable, rejected = "LedgerDecodeError", "BlockRejected"
    solo = certificate(["dave"], ["dave"], 1, block_hash)
    four = ["alice", "bob", "carol", "dave"]
    three_of_four = certificate(["carol", "alice", "dave"], four, 1, block_hash)
    sig = bytes.fromhex(solo["signatures"][0][1])
    pairs = sorted((ACCT[n], KEYS[n].sign(commit_payload(1, block_hash)).signature) for n in four)
    return {
        "genesis": genesis.to_json(),
        "block": {
            "txs": txs,
            "header": {
                "chain_id": CHAIN,
                "height": 1,
                "prev_hash": ZERO_HASH.hex(),
                "time_ms": BLOCK_TIME_MS,
                "proposer": ACCT["dave"].hex(),
                "tx_root": root.hex(),
                "tx_count": len(encoded),
                "state_hash": state_hash,
            },
            "header_hex": header.hex(),
            "hex": block_hex(fields, encoded),
            "hash": block_hash.hex(),
            "accounts_after": accounts,
        },
        "certificates": [{"name": "solo", **solo}, {"name": "three_of_four", **three_of_four}],
        # Rejected by decode_block (LedgerDecodeError) or, decoded fine, by apply_block on the
        # genesis state with prev_hash zero and prev_time_ms 0 (BlockRejected).
        "invalid_blocks": [
            {"name": "tx_count_mismatch", "hex": block_hex(replace(6, 3), encoded), "error": undecodable},
            {"name": "tx_root_mismatch", "hex": block_hex(replace(5, bytes(32)), encoded), "error": undecodable},
            {"name": "height_non_minimal_uint16", "hex": non_minimal.hex(), "error": undecodable},
            {"name": "header_of_7", "hex": block_hex(fields[:7], encoded), "error": undecodable},
            {"name": "wrong_state_hash", "hex": block_hex(replace(7, bytes(32)), encoded), "error": rejected},
            {"name": "wrong_prev_hash", "hex": block_hex(replace(2, b"\x01" * 32), encoded), "error": rejected},
            {"name": "height_2", "hex": block_hex(replace(1, 2), encoded), "error": rejected},
            {"name": "wrong_chain", "hex": block_hex(replace(0, "prsm-vectors-2"), encoded), "error": rejected},
        ],
        "invalid_certificates": [
            {"name": "empty", "hex": pack([]).hex()},
            {"name": "descending", "hex": pack([[a, s] for a, s in reversed(pairs)]).hex()},
            {"name": "duplicate_account", "hex": pack([[ACCT["dave"], sig], [ACCT["dave"], sig]]).hex()},
            {"name": "short_signature", "hex": pack([[ACCT["dave"], sig[:63]]]).hex()},
        ],
    }


def genesis_stakes() -> dict[str, Any]:
    """A genesis with stakes (r3): bob holds only stake, carol a balance and a stake."""
    genesis = Genesis(
        chain_id=CHAIN,
        network="vectors",
        genesis_time=0,
        balances={ACCT["alice"].hex(): str(100 * FTNS), ACCT["carol"].hex(): "7"},
        stakes={ACCT["bob"].hex(): str(30 * FTNS), ACCT["carol"].hex(): "5", ACCT["dave"].hex(): "0"},
        params={"unbonding_blocks": 2},
    )
    state = LedgerState.from_genesis(genesis)
    accounts = {k.hex(): account_json(a) for k, a in state.accounts()}
    final = spec_state_hash(0, accounts, [])
    if final != state.state_hash().hex():
        raise SystemExit("prsm_node.ledger's state hash of a staked genesis disagrees with the spec formula")
    canonical = json.dumps(genesis.to_json(), sort_keys=True, separators=(",", ":"))
    return {
        "genesis": genesis.to_json(),
        "genesis_id": hashlib.sha256(canonical.encode()).hexdigest(),
        "total_supply": str(state.total_supply),
        "accounts": accounts,
        "state_hash": final,
    }


def vectors() -> dict[str, Any]:
    txs, rcpt = transactions()
    return {
        "chain_id": CHAIN,
        "keys": [{"name": n, "seed": bytes(k).hex(), "account": ACCT[n].hex()} for n, k in KEYS.items()],
        "transactions": txs,
        "receipt": rcpt,
        "invalid": invalid(txs),
        "state": state_sequence(txs),
        "blocks": block_vectors(),
        "breaker_state": breaker_sequence(),
        "genesis_stakes": genesis_stakes(),
    }


def main() -> int:
    return write_or_check(OUT, json.dumps(vectors(), indent=2) + "\n", None)


if __name__ == "__main__":
    sys.exit(main())

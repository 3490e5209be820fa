"""protocols/ledger-vectors.json: the codec, signatures, state hash, blocks and commit
certificates against the spec's bytes.

scripts/gen_ledger_vectors.py builds the vector bytes with plain msgpack + pynacl from the
spec (not with prsm_node.ledger.codec) and recomputes the final state hash from the spec's
formula, so these tests check the implementation against the document.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from prsm_node.breaker.votes import decode_vote
from prsm_node.genesis import Genesis
from prsm_node.keys import NodeKey
from prsm_node.ledger import (
    Account,
    LedgerState,
    Receipt,
    Settle,
    Stake,
    Transfer,
    Tx,
    TxRejected,
    Unstake,
    decode_receipt,
    decode_tx,
    encode_receipt,
    encode_tx,
    receipt_signing_payload,
    sign_receipt,
    sign_tx,
    signing_payload,
    tx_hash,
    verify_receipt_signature,
    verify_tx_signature,
)
from prsm_node.ledger import exceptions as errors
from prsm_node.ledger.block import (
    ZERO_HASH,
    Block,
    BlockRejected,
    Certificate,
    apply_block,
    commit_payload,
    decode_block,
    decode_certificate,
    encode_block,
    encode_certificate,
    make_block,
    sign_commit,
    tx_root,
    verify_certificate,
)
from prsm_node.ledger.storage import genesis_id
from prsm_node.ledger.types import Body, BreakerVote

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "protocols" / "ledger-vectors.json").read_text())
KEYS = {k["account"]: nacl.signing.SigningKey(bytes.fromhex(k["seed"])) for k in VECTORS["keys"]}


def receipt_from(f: dict[str, Any]) -> Receipt:
    return Receipt(
        receipt_id=bytes.fromhex(f["receipt_id"]),
        payer=bytes.fromhex(f["payer"]),
        payee=bytes.fromhex(f["payee"]),
        amount=int(f["amount"]),
        chain_id=f["chain_id"],
        signature=bytes.fromhex(f.get("signature", "")),
    )


def body_from(b: dict[str, Any]) -> Body:
    kind = b["kind"]
    if kind == "transfer":
        return Transfer(bytes.fromhex(b["to"]), int(b["amount"]))
    if kind == "stake":
        return Stake(int(b["amount"]))
    if kind == "unstake":
        return Unstake(int(b["amount"]))
    if kind == "breaker_vote":
        return BreakerVote(decode_vote(bytes.fromhex(b["vote"])))
    assert kind == "settle"
    return Settle(tuple(receipt_from(r) for r in b["receipts"]))


def test_keys_derive_from_seeds() -> None:
    assert len(KEYS) == 4
    for account, key in KEYS.items():
        assert bytes(key.verify_key).hex() == account


@pytest.mark.parametrize("v", VECTORS["transactions"], ids=[v["name"] for v in VECTORS["transactions"]])
def test_transaction_vector(v: dict[str, Any]) -> None:
    f = v["fields"]
    tx = Tx(
        chain_id=f["chain_id"],
        sender=bytes.fromhex(f["sender"]),
        nonce=f["nonce"],
        fee=int(f["fee"]),
        body=body_from(f["body"]),
        signature=bytes.fromhex(v["signature"]),
    )
    assert signing_payload(tx).hex() == v["signing_payload"]
    signed = sign_tx(KEYS[f["sender"]], chain_id=tx.chain_id, nonce=tx.nonce, fee=tx.fee, body=tx.body)
    assert signed == tx and verify_tx_signature(tx)
    assert encode_tx(tx).hex() == v["hex"]
    assert decode_tx(bytes.fromhex(v["hex"])) == tx
    assert tx_hash(tx).hex() == v["hash"]


def test_receipt_vector() -> None:
    v = VECTORS["receipt"]
    r = receipt_from(v["fields"] | {"signature": v["signature"]})
    assert receipt_signing_payload(r).hex() == v["signing_payload"]
    key = KEYS[v["fields"]["payer"]]
    assert sign_receipt(key, receipt_id=r.receipt_id, payee=r.payee, amount=r.amount, chain_id=r.chain_id) == r
    assert verify_receipt_signature(r)
    assert encode_receipt(r).hex() == v["hex"] and decode_receipt(bytes.fromhex(v["hex"])) == r


@pytest.mark.parametrize("v", VECTORS["invalid"], ids=[v["name"] for v in VECTORS["invalid"]])
def test_invalid_vector(v: dict[str, str]) -> None:
    with pytest.raises(getattr(errors, v["error"])) as info:
        decode_tx(bytes.fromhex(v["hex"]))
    assert type(info.value).__name__ == v["error"]


def test_state_sequence() -> None:
    s = VECTORS["state"]
    by_name = {v["name"]: decode_tx(bytes.fromhex(v["hex"])) for v in VECTORS["transactions"]}
    state = LedgerState.from_genesis(Genesis.from_json(s["genesis"], "vectors"))
    for step in s["steps"]:
        proposer = bytes.fromhex(step["proposer"])
        if step.get("end_block"):
            state.end_block(step["height"], proposer=proposer)
            result = "ok"
        else:
            try:
                state.apply(by_name[step["tx"]], proposer=proposer, height=step["height"])
                result = "ok"
            except TxRejected as exc:
                result = type(exc).__name__
        assert result == step["result"]
        assert state.state_hash().hex() == step["state_hash"]
    assert {k.hex(): a for k, a in state.accounts()} == {
        k: Account(int(a["balance"]), a["nonce"], int(a["stake"]), tuple((int(x), h) for x, h in a["unbonding"]))
        for k, a in s["accounts"].items()
    }
    assert [k.hex() for k in state.settled_receipts()] == s["settled"]
    assert state.height == s["height"] and str(state.total_supply) == s["total_supply"]
    assert state.state_hash().hex() == s["state_hash"] == state.recompute_state_hash().hex()
    state.check_supply()


def test_genesis_stakes() -> None:
    """r3: genesis stakes become account stake; they count in the supply, the state hash and
    the genesis id; a zero stake is dropped like a zero balance."""
    s = VECTORS["genesis_stakes"]
    genesis = Genesis.from_json(s["genesis"], "vectors")
    state = LedgerState.from_genesis(genesis)
    assert {k.hex(): a for k, a in state.accounts()} == {
        k: Account(int(a["balance"]), a["nonce"], int(a["stake"]), ()) for k, a in s["accounts"].items()
    }
    assert str(state.total_supply) == s["total_supply"]
    assert state.state_hash().hex() == s["state_hash"] == state.recompute_state_hash().hex()
    assert genesis_id(genesis).hex() == s["genesis_id"]
    state.check_supply()


def test_genesis_without_stakes_keeps_its_json() -> None:
    """A genesis with no stakes writes no ``stakes`` key: r2 genesis ids are unchanged."""
    genesis = Genesis.from_json(VECTORS["state"]["genesis"], "vectors")
    assert "stakes" not in genesis.to_json() and genesis.to_json() == VECTORS["state"]["genesis"]


def test_breaker_vote_sequence() -> None:
    """Votes recorded once, a replay stale, an unstaked voter refused, a newer epoch recorded;
    the final state hash includes the vote records (the spec formula, in the generator)."""
    s = VECTORS["breaker_state"]
    by_name = {v["name"]: decode_tx(bytes.fromhex(v["hex"])) for v in s["transactions"]}
    state = LedgerState.from_genesis(Genesis.from_json(s["genesis"], "vectors"))
    for step in s["steps"]:
        proposer = bytes.fromhex(step["proposer"])
        if step.get("end_block"):
            state.end_block(step["height"], proposer=proposer)
            result = "ok"
        else:
            try:
                state.apply(by_name[step["tx"]], proposer=proposer, height=step["height"])
                result = "ok"
            except TxRejected as exc:
                result = type(exc).__name__
        assert result == step["result"]
        assert state.state_hash().hex() == step["state_hash"]
    got = {(r.vote.model + r.vote.voter).hex(): (r.vote.epoch, r.height) for r in state.vote_records()}
    assert got == {k: (decode_vote(bytes.fromhex(v["vote"])).epoch, v["height"]) for k, v in s["votes"].items()}
    assert state.state_hash().hex() == s["state_hash"] == state.recompute_state_hash().hex()
    state.check_supply()


def test_vector_file_is_up_to_date() -> None:
    script = ROOT / "scripts" / "gen_ledger_vectors.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------ blocks and certificates

BLOCKS = VECTORS["blocks"]


def _vector_block() -> tuple[Block, list[Tx]]:
    return decode_block(bytes.fromhex(BLOCKS["block"]["hex"]))


def test_block_vector_is_what_make_block_produces() -> None:
    v = BLOCKS["block"]
    genesis = Genesis.from_json(BLOCKS["genesis"], "vectors")
    state = LedgerState.from_genesis(genesis)
    txs = [decode_tx(bytes.fromhex(t["hex"])) for t in v["txs"]]
    h = v["header"]
    block, included, dropped = make_block(
        state, txs, proposer=bytes.fromhex(h["proposer"]), prev_hash=ZERO_HASH, time_ms=h["time_ms"]
    )
    assert included == txs and dropped == []
    assert block.header.fields() == [
        h["chain_id"],
        h["height"],
        bytes.fromhex(h["prev_hash"]),
        h["time_ms"],
        bytes.fromhex(h["proposer"]),
        bytes.fromhex(h["tx_root"]),
        h["tx_count"],
        bytes.fromhex(h["state_hash"]),
    ]
    assert tx_root([tx_hash(t) for t in txs]).hex() == h["tx_root"]
    assert encode_block(block).hex() == v["hex"]
    assert block.hash().hex() == v["hash"]
    assert state.state_hash().hex() == h["state_hash"] == state.recompute_state_hash().hex()
    assert {k.hex(): a for k, a in state.accounts()} == {
        k: Account(int(a["balance"]), a["nonce"], int(a["stake"]), tuple((int(x), r) for x, r in a["unbonding"]))
        for k, a in v["accounts_after"].items()
    }


def test_block_vector_decodes_and_applies() -> None:
    v = BLOCKS["block"]
    block, txs = _vector_block()
    assert [encode_tx(t).hex() for t in txs] == [t["hex"] for t in v["txs"]]
    assert encode_block(block).hex() == v["hex"] and block.hash().hex() == v["hash"]
    state = LedgerState.from_genesis(Genesis.from_json(BLOCKS["genesis"], "vectors"))
    apply_block(state, block, txs, prev_hash=ZERO_HASH, prev_time_ms=0)
    assert state.height == 1 and state.state_hash().hex() == v["header"]["state_hash"]


@pytest.mark.parametrize("v", BLOCKS["certificates"], ids=[v["name"] for v in BLOCKS["certificates"]])
def test_certificate_vector(v: dict[str, Any]) -> None:
    block, _ = _vector_block()
    assert commit_payload(block.header.chain_id, block.height, block.hash()).hex() == v["commit_payload"]
    by_account = {bytes(k.verify_key).hex(): k for k in KEYS.values()}
    cert = Certificate(tuple(sign_commit(by_account[a], block) for a in v["signers"]))
    assert [[a.hex(), s.hex()] for a, s in cert.signatures] == v["signatures"]
    assert encode_certificate(cert).hex() == v["hex"]
    assert decode_certificate(bytes.fromhex(v["hex"])) == cert
    validators = frozenset(bytes.fromhex(a) for a in v["validators"])
    n = len(validators)
    assert v["quorum"] == n - (n - 1) // 3
    verify_certificate(cert, block, validators, v["quorum"])
    with pytest.raises(BlockRejected):
        verify_certificate(cert, block, validators, len(cert.signatures) + 1)
    other, _ = decode_block(bytes.fromhex(BLOCKS["invalid_blocks"][-1]["hex"]))  # another chain id
    with pytest.raises(BlockRejected):
        verify_certificate(cert, other, validators, v["quorum"])


def test_genesis_validator_peer_id() -> None:
    dave = next(k for k in VECTORS["keys"] if k["name"] == "dave")
    (validator,) = BLOCKS["genesis"]["validators"]
    assert validator["account"] == dave["account"]
    assert validator["peer_id"] == NodeKey(bytes.fromhex(dave["seed"])).peer_id.to_base58()


@pytest.mark.parametrize("v", BLOCKS["invalid_blocks"], ids=[v["name"] for v in BLOCKS["invalid_blocks"]])
def test_invalid_block_vector(v: dict[str, str]) -> None:
    data = bytes.fromhex(v["hex"])
    if v["error"] == "LedgerDecodeError":
        with pytest.raises(errors.LedgerDecodeError):
            decode_block(data)
        return
    assert v["error"] == "BlockRejected"
    block, txs = decode_block(data)
    state = LedgerState.from_genesis(Genesis.from_json(BLOCKS["genesis"], "vectors"))
    before = state.state_hash()
    with pytest.raises(BlockRejected):
        apply_block(state, block, txs, prev_hash=ZERO_HASH, prev_time_ms=0)
    assert state.height == 0 and state.state_hash() == before and state.changes().accounts == {}


@pytest.mark.parametrize("v", BLOCKS["invalid_certificates"], ids=[v["name"] for v in BLOCKS["invalid_certificates"]])
def test_invalid_certificate_vector(v: dict[str, str]) -> None:
    with pytest.raises(errors.LedgerDecodeError):
        decode_certificate(bytes.fromhex(v["hex"]))

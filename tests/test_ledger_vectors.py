"""protocols/ledger-vectors.json: the codec, signatures and state hash against the spec's bytes.

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

from prsm_node.genesis import Genesis
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
from prsm_node.ledger.types import Body

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


def test_vector_file_is_up_to_date() -> None:
    script = ROOT / "scripts" / "gen_ledger_vectors.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

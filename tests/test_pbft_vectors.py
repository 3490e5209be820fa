"""protocols/pbft-vectors.json: the PBFT codec and signatures against the spec's bytes.

scripts/gen_pbft_vectors.py builds the vector bytes with plain msgpack + pynacl from
protocols/pbft.md (not with prsm_node.consensus.messages), so these tests check the
implementation against the document: decode -> re-encode, the signing payload, the
signature made with the seed key, and the hash are byte-identical for every message kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nacl.signing
import pytest

from prsm_node.consensus import (
    ConsensusDecodeError,
    KeySigner,
    Kind,
    NewView,
    ValidatorSet,
    batch_digest,
    decode,
    encode,
    request_digest,
    signing_payload,
)
from prsm_node.consensus.messages import message_hash
from prsm_node.consensus.viewchange import check_new_view

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "protocols" / "pbft-vectors.json").read_text())
CHAIN = VECTORS["chain_id"]
KEYS = {k["name"]: nacl.signing.SigningKey(bytes.fromhex(k["seed"])) for k in VECTORS["keys"]}
VS = ValidatorSet(CHAIN, tuple(bytes.fromhex(v) for v in VECTORS["validators"]))
MESSAGES = {m["name"]: m for m in VECTORS["messages"]}


def test_every_kind_has_a_vector() -> None:
    assert {m["kind"] for m in VECTORS["messages"]} == {k.value for k in Kind}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_vector(name: str) -> None:
    v = MESSAGES[name]
    data = bytes.fromhex(v["hex"])
    m = decode(data)
    assert m.kind == v["kind"]
    assert m.sender == bytes(KEYS[v["sender"]].verify_key)
    assert encode(m) == data
    assert signing_payload(m, CHAIN).hex() == v["signing_payload"]
    unsigned = dataclasses.replace(m, signature=b"")
    resigned = dataclasses.replace(
        unsigned, signature=KeySigner(KEYS[v["sender"]]).sign(signing_payload(unsigned, CHAIN))
    )
    assert resigned.signature.hex() == v["signature"]
    assert encode(resigned) == data
    assert message_hash(m).hex() == v["hash"] == hashlib.sha256(data).hexdigest()
    VS.check(m)  # signature verifies against the validator set


def test_digests() -> None:
    d = VECTORS["digests"]
    batch = tuple(bytes.fromhex(r) for r in d["batch"])
    assert batch_digest(CHAIN, batch).hex() == d["batch_digest"]
    assert batch_digest(CHAIN, ()).hex() == d["null_batch_digest"]
    assert request_digest(batch[0]).hex() == d["request_digest"]


def test_the_new_view_vector_is_a_valid_new_view() -> None:
    nv = decode(bytes.fromhex(MESSAGES["new-view"]["hex"]))
    assert isinstance(nv, NewView)
    plan = check_new_view(VS, nv, log_window=32)
    assert (plan.min_s, plan.max_s) == (4, 5)
    cm = decode(bytes.fromhex(MESSAGES["committed"]["hex"]))
    VS.check_commit_cert(cm.certificate)  # type: ignore[union-attr]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_vectors_are_rejected(case: dict[str, str]) -> None:
    assert case["error"] == "ConsensusDecodeError"
    with pytest.raises(ConsensusDecodeError):
        decode(bytes.fromhex(case["hex"]))


def test_vectors_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_pbft_vectors.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr

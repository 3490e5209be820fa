"""protocols/breaker-vectors.json: votes, check_vote, the tally and catch-up messages against
the spec's bytes.

scripts/gen_breaker_vectors.py builds the vector bytes with plain msgpack + pynacl from
protocols/breaker.md (not with prsm_node.breaker), so these tests check the implementation
against the document.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from prsm_node.breaker import (
    Action,
    BreakerParams,
    Malformed,
    StakeTable,
    Tally,
    VoteRejected,
    check_vote,
    decode_message,
    decode_vote,
    encode_message,
    encode_vote,
    sign_vote,
    signing_payload,
    verify_vote,
    vote_id,
)
from prsm_node.breaker.messages import make_digest

ROOT = Path(__file__).resolve().parent.parent
VECTORS: dict[str, Any] = json.loads((ROOT / "protocols" / "breaker-vectors.json").read_text(encoding="utf-8"))


def test_file_is_current() -> None:
    script = ROOT / "scripts" / "gen_breaker_vectors.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", VECTORS["votes"], ids=lambda c: c["name"])
def test_votes(case: dict[str, Any]) -> None:
    f = case["fields"]
    seed = next(k["seed"] for k in VECTORS["keys"].values() if k["public_key"] == f["voter"])
    v = sign_vote(
        nacl.signing.SigningKey(bytes.fromhex(seed)),
        chain_id=f["chain_id"],
        model=bytes.fromhex(f["model"]),
        action=Action(f["action"]),
        epoch=f["epoch"],
        timestamp_ms=f["timestamp_ms"],
        reason=f["reason"],
    )
    assert signing_payload(v).hex() == case["signing_payload"]
    assert v.signature.hex() == case["signature"]
    assert encode_vote(v).hex() == case["hex"]
    assert decode_vote(bytes.fromhex(case["hex"])) == v
    assert vote_id(v).hex() == case["vote_id"]
    assert verify_vote(v)


@pytest.mark.parametrize("case", VECTORS["invalid_votes"], ids=lambda c: c["name"])
def test_invalid_votes(case: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        decode_vote(bytes.fromhex(case["hex"]))


@pytest.mark.parametrize("case", VECTORS["checks"], ids=lambda c: c["name"])
def test_checks(case: dict[str, Any]) -> None:
    v = decode_vote(bytes.fromhex(case["vote"]))

    def run() -> None:
        check_vote(
            v,
            chain_id=case["chain_id"],
            stake_of=lambda voter: case["stake"],
            now_ms=case["now_ms"],
            max_age_ms=case["max_age_ms"],
            max_future_ms=case["max_future_ms"],
            last_epoch_of=lambda voter, model: case["last_epoch"],
        )

    if case["error"] is None:
        run()
    else:
        with pytest.raises(VoteRejected) as exc:
            run()
        assert exc.value.code == case["error"]


def test_tally() -> None:
    t = VECTORS["tally"]
    fraction = {k: Fraction(t[k]["numerator"], t[k]["denominator"]) for k in ("halt_threshold", "resume_threshold")}
    tally = Tally(BreakerParams(**fraction))
    stakes = StakeTable({bytes.fromhex(k): s for k, s in t["stakes"].items()})
    assert stakes.total_stake() == t["total_stake"]
    by_name = {v["name"]: decode_vote(bytes.fromhex(v["hex"])) for v in VECTORS["votes"]}
    model = bytes.fromhex(t["model"])
    for step in t["steps"]:
        tally.add(by_name[step["vote"]], stakes)
        status = tally.status(model, stakes)
        assert (status.halt_stake, status.resume_stake, status.state.name.lower()) == (
            step["halt_stake"],
            step["resume_stake"],
            step["state"],
        ), step["vote"]


@pytest.mark.parametrize("case", VECTORS["messages"], ids=lambda c: c["name"])
def test_messages(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    assert encode_message(decode_message(data)) == data


@pytest.mark.parametrize("case", VECTORS["invalid_messages"], ids=lambda c: c["name"])
def test_invalid_messages(case: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        decode_message(bytes.fromhex(case["hex"]))


def test_digest_vector() -> None:
    d = VECTORS["digest"]
    votes = [decode_vote(bytes.fromhex(h)) for h in d["votes"]]
    assert make_digest(votes, d["before_ms"]).hex() == d["digest"]
    assert make_digest(votes, d["before_ms_excluding_all"]).hex() == d["digest_excluding_all"]

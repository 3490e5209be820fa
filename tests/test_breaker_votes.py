"""Breaker votes: codec, signatures and check_vote."""

from __future__ import annotations

import dataclasses

import msgpack
import nacl.signing
import pytest

from prsm_node.breaker import (
    MAX_VOTE_SIZE,
    Action,
    BadSignature,
    Malformed,
    Replayed,
    Stale,
    Unstaked,
    Vote,
    WrongChain,
    check_vote,
    decode_vote,
    encode_vote,
    sign_vote,
    signing_payload,
    verify_vote,
    vote_id,
)

CHAIN = "prsm-test"
KEY = nacl.signing.SigningKey(b"\x01" * 32)
OTHER = nacl.signing.SigningKey(b"\x02" * 32)
MODEL = bytes(range(32))
NOW = 1_800_000_000_000


def vote(**kw: object) -> Vote:
    args: dict[str, object] = dict(
        chain_id=CHAIN, model=MODEL, action=Action.HALT, epoch=1, timestamp_ms=NOW, reason="unsafe"
    )
    args.update(kw)
    return sign_vote(KEY, **args)  # type: ignore[arg-type]


def test_roundtrip_and_signature() -> None:
    v = vote()
    data = encode_vote(v)
    assert decode_vote(data) == v
    assert encode_vote(decode_vote(data)) == data
    assert verify_vote(v)
    assert v.voter == bytes(KEY.verify_key)
    assert len(vote_id(v)) == 32
    payload = msgpack.unpackb(signing_payload(v))
    assert payload == ["prsm-breaker-vote-v1", *_fields(v)[:-1]]
    for change in (
        {"reason": "other"},
        {"epoch": 2},
        {"timestamp_ms": NOW + 1},
        {"action": Action.RESUME},
        {"model": b"\x00" * 32},
        {"chain_id": "prsm-other"},
        {"voter": bytes(OTHER.verify_key)},
    ):
        assert not verify_vote(dataclasses.replace(v, **change)), change


def test_largest_vote_fits() -> None:
    v = sign_vote(
        KEY,
        chain_id="c" * 64,
        model=MODEL,
        action=Action.RESUME,
        epoch=2**64 - 1,
        timestamp_ms=2**64 - 1,
        reason="é" * 140,
    )
    assert len(encode_vote(v)) == 503 <= MAX_VOTE_SIZE


@pytest.mark.parametrize(
    "change",
    [
        {"reason": "x" * 281},
        {"reason": "\ud800"},
        {"epoch": 2**64},
        {"epoch": -1},
        {"timestamp_ms": 2**64},
        {"chain_id": ""},
        {"chain_id": "c" * 65},
        {"model": b"\x00" * 31},
        {"voter": b"\x00" * 33},
        {"signature": b"\x00" * 63},
        {"action": 3},
        {"action": True},
        {"epoch": True},
    ],
)
def test_encode_refuses_bad_fields(change: dict[str, object]) -> None:
    with pytest.raises(Malformed):
        encode_vote(dataclasses.replace(vote(), **change))  # type: ignore[arg-type]


def _fields(v: Vote) -> list[object]:
    return [v.chain_id, v.voter, v.model, int(v.action), v.epoch, v.timestamp_ms, v.reason, v.signature]


def test_decode_rejects() -> None:
    v = vote()
    good = encode_vote(v)
    f = _fields(v)
    bad = [
        good + b"\x00",  # trailing byte
        good[:-1],  # truncated
        b"\xdc\x00\x08" + good[1:],  # array16 header: non-minimal
        msgpack.packb(f[:-1], use_bin_type=True),  # 7 fields
        msgpack.packb([*f[:3], 0, *f[4:]], use_bin_type=True),  # action 0
        msgpack.packb([*f[:3], True, *f[4:]], use_bin_type=True),  # bool action
        msgpack.packb([*f[:6], "x" * 281, f[7]], use_bin_type=True),  # long reason
        msgpack.packb([f[0], f[1].decode("latin-1"), *f[2:]], use_bin_type=True),  # str voter
        msgpack.packb([*f[:4], 1.0, *f[5:]], use_bin_type=True),  # float epoch
        msgpack.packb([*f[:4], -1, *f[5:]], use_bin_type=True),  # negative epoch
        msgpack.packb({"a": 1}),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        b"\xc1",
        b"\x00" * (MAX_VOTE_SIZE + 1),
    ]
    # uint64 holding 1 (non-minimal) for the epoch
    bad.append(good.replace(b"\x01" + msgpack.packb(NOW), b"\xcf" + (1).to_bytes(8, "big") + msgpack.packb(NOW), 1))
    for data in bad:
        with pytest.raises(Malformed):
            decode_vote(data)


def _check(v: Vote, *, stake: int = 10, last: int | None = None, max_age: int | None = 60_000) -> None:
    check_vote(
        v,
        chain_id=CHAIN,
        stake_of=lambda voter: stake,
        now_ms=NOW,
        max_age_ms=max_age,
        max_future_ms=5_000,
        last_epoch_of=lambda voter, model: last,
    )


def test_check_vote_accepts_and_rejects() -> None:
    _check(vote())
    _check(vote(epoch=5), last=4)
    _check(vote(timestamp_ms=NOW - 60_000))
    _check(vote(timestamp_ms=NOW + 5_000))
    with pytest.raises(WrongChain) as wc:
        _check(vote(chain_id="prsm-other"))
    assert wc.value.peer_fault
    with pytest.raises(BadSignature) as bs:
        _check(dataclasses.replace(vote(), reason="edited"))
    assert bs.value.code == "bad_signature" and bs.value.peer_fault
    with pytest.raises(Unstaked) as us:
        _check(vote(), stake=0)
    assert not us.value.peer_fault
    with pytest.raises(Stale):
        _check(vote(timestamp_ms=NOW - 60_001))
    with pytest.raises(Stale):
        _check(vote(timestamp_ms=NOW + 5_001))
    with pytest.raises(Replayed) as rp:
        _check(vote(epoch=4), last=4)
    assert (rp.value.last, rp.value.got) == (4, 4)
    with pytest.raises(Malformed):
        _check(dataclasses.replace(vote(), signature=b""))
    # catch-up: no age limit, the future limit stays
    _check(vote(timestamp_ms=0), max_age=None)
    with pytest.raises(Stale):
        _check(vote(timestamp_ms=NOW + 5_001), max_age=None)


def test_check_order_cheap_rules_first() -> None:
    forged = dataclasses.replace(vote(chain_id="prsm-other"), signature=b"\x00" * 64)
    with pytest.raises(WrongChain):
        _check(forged)
    with pytest.raises(Replayed):
        _check(dataclasses.replace(vote(epoch=1), signature=b"\x00" * 64), last=3)

"""`/prsm/breaker/1.0.0` catch-up messages and breaker genesis parameters."""

from __future__ import annotations

from fractions import Fraction

import msgpack
import nacl.signing
import pytest

from prsm_node.breaker import (
    Action,
    BreakerParams,
    BreakerParamsError,
    ErrorCode,
    ErrorMessage,
    GetVotes,
    Malformed,
    UnknownMessageType,
    Votes,
    catchup_order,
    decode_message,
    decode_request,
    encode_message,
    encode_vote,
    next_request,
    select_votes,
    sign_vote,
)
from prsm_node.breaker.messages import MAX_REPLY_SIZE, MAX_VOTES_PER_REPLY

KEY = nacl.signing.SigningKey(b"\x07" * 32)


def vote(model: int, ts: int, epoch: int = 1):  # type: ignore[no-untyped-def]
    return sign_vote(
        KEY, chain_id="c", model=bytes([model]) * 32, action=Action.HALT, epoch=epoch, timestamp_ms=ts, reason=""
    )


def test_roundtrip() -> None:
    msgs = [
        GetVotes(),
        GetVotes(b"\x01" * 32, 5, b"\x02" * 72),
        Votes((vote(1, 1), vote(2, 2)), more=True),
        Votes(()),
        ErrorMessage(ErrorCode.BUSY, "later"),
    ]
    for m in msgs:
        assert decode_message(encode_message(m)) == m
    assert encode_message(GetVotes()) == b"\x94\x01\xc4\x00\x00\xc4\x00"
    assert decode_request(encode_message(GetVotes())) == GetVotes()


def test_decode_rejects() -> None:
    v = encode_vote(vote(1, 1))
    bad = [
        msgpack.packb([9], use_bin_type=True),
        msgpack.packb([1, b"", 0], use_bin_type=True),
        msgpack.packb([1, b"\x00" * 31, 0, b""], use_bin_type=True),
        msgpack.packb([1, b"", -1, b""], use_bin_type=True),
        msgpack.packb([1, b"", 0, b"\x00" * 71], use_bin_type=True),
        msgpack.packb([2, [v], 2], use_bin_type=True),
        msgpack.packb([2, [v + b"\x00"], 0], use_bin_type=True),
        msgpack.packb([2, [v] * (MAX_VOTES_PER_REPLY + 1), 0], use_bin_type=True),
        msgpack.packb([2, [v], False], use_bin_type=True),
        msgpack.packb([3, 99, ""], use_bin_type=True),
        msgpack.packb([3, 1, "x" * 257], use_bin_type=True),
        b"\x94\x01\xc4\x00\xcc\x00\xc4\x00",  # uint8 holding 0
        encode_message(GetVotes()) + b"\x00",
    ]
    for data in bad:
        with pytest.raises(Malformed):
            decode_message(data)
    with pytest.raises(UnknownMessageType):
        decode_message(msgpack.packb([9]))
    with pytest.raises(UnknownMessageType):
        decode_request(encode_message(Votes(())))
    with pytest.raises(Malformed):
        decode_request(encode_message(GetVotes()) + b"\x00" * 200)
    full = Votes(tuple(vote(i % 256, i, epoch=2**64 - 1) for i in range(MAX_VOTES_PER_REPLY)))
    assert len(encode_message(full)) <= MAX_REPLY_SIZE


def test_paging_covers_every_vote_once() -> None:
    votes = [vote(m, ts) for m in range(40) for ts in (5, 5, 6)] + [vote(1, 5, epoch=2)]
    votes = list({(v.model, v.epoch, v.timestamp_ms): v for v in votes}.values())
    got = []
    request: GetVotes | None = GetVotes()
    while request is not None:
        reply = select_votes(votes, request, limit=7)
        got.extend(reply.votes)
        request = next_request(request, reply)
    assert got == catchup_order(votes)
    one = select_votes(votes, GetVotes(model=bytes([3]) * 32))
    assert {v.model for v in one.votes} == {bytes([3]) * 32} and not one.more
    assert all(v.timestamp_ms >= 6 for v in select_votes(votes, GetVotes(since_ms=6)).votes)


def test_params() -> None:
    assert BreakerParams.from_genesis_params({"min_fee": 3}) == BreakerParams()
    p = BreakerParams.from_genesis_params(
        {
            "breaker_halt_threshold": {"numerator": 1, "denominator": 2},
            "breaker_resume_threshold": "3/4",
            "breaker_max_vote_age_ms": 1000,
        }
    )
    assert (p.halt_threshold, p.resume_threshold, p.max_vote_age_ms) == (Fraction(1, 2), Fraction(3, 4), 1000)
    for bad in [
        {"breaker_halt_threshold": 0.33},
        {"breaker_halt_threshold": "1/0"},
        {"breaker_halt_threshold": "0/3"},
        {"breaker_halt_threshold": "4/3"},
        {"breaker_halt_threshold": "1 /3"},
        {"breaker_halt_threshold": {"numerator": 1}},
        {"breaker_halt_threshold": {"numerator": True, "denominator": 3}},
        {"breaker_halt_threshold": "3/4", "breaker_resume_threshold": "1/2"},
        {"breaker_resume_threshold": "1/2000000"},
        {"breaker_max_vote_age_ms": -1},
        {"breaker_max_vote_future_ms": "5"},
    ]:
        with pytest.raises(BreakerParamsError):
            BreakerParams.from_genesis_params(bad)

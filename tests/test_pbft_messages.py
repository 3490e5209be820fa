"""The PBFT codec: round trips of every message kind and strict decoding of untrusted bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.consensus import (
    Checkpoint,
    Commit,
    CommitCertificate,
    Committed,
    ConsensusDecodeError,
    Message,
    NewView,
    OEntry,
    Prepare,
    PreparedCert,
    PrePrepare,
    RecordError,
    Request,
    Status,
    ViewChange,
    decode,
    decode_record,
    encode,
)
from prsm_node.consensus.messages import MAX_MESSAGE_SIZE, MAX_REQUEST_SIZE

KEY = st.binary(min_size=32, max_size=32)
SIG = st.binary(min_size=64, max_size=64)
DIGEST = st.binary(min_size=32, max_size=32)
UINT = st.integers(min_value=0, max_value=2**64 - 1)
BATCH = st.lists(st.binary(min_size=1, max_size=40), max_size=5).map(tuple)
SIGS = st.lists(st.tuples(KEY, SIG), max_size=4).map(tuple)
PREPARED = st.builds(PreparedCert, UINT, UINT, DIGEST, SIG, SIGS)
VIEW_CHANGE = st.builds(ViewChange, KEY, UINT, UINT, DIGEST, SIGS, st.lists(PREPARED, max_size=3).map(tuple), SIG)
MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Request, KEY, st.binary(min_size=1, max_size=100), SIG),
    st.builds(PrePrepare, KEY, UINT, UINT, DIGEST, BATCH, SIG),
    st.builds(Prepare, KEY, UINT, UINT, DIGEST, SIG),
    st.builds(Commit, KEY, UINT, UINT, DIGEST, SIG),
    st.builds(Checkpoint, KEY, UINT, DIGEST, SIG),
    VIEW_CHANGE,
    st.builds(
        NewView,
        KEY,
        UINT,
        st.lists(VIEW_CHANGE, max_size=3).map(tuple),
        st.lists(st.builds(OEntry, UINT, DIGEST, SIG), max_size=3).map(tuple),
        SIG,
    ),
    st.builds(Status, KEY, UINT, st.booleans(), UINT, UINT, SIG),
    st.builds(Committed, KEY, BATCH, st.builds(CommitCertificate, UINT, UINT, DIGEST, SIGS), SIG),
)


@settings(max_examples=300, deadline=None)
@given(MESSAGES)
def test_round_trip(m: Message) -> None:
    data = encode(m)
    assert decode(data) == m
    assert encode(decode(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    try:
        m = decode(data)
    except ConsensusDecodeError:
        return
    assert encode(m) == data


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


K, S, D = b"\1" * 32, b"\2" * 64, b"\3" * 32


@pytest.mark.parametrize(
    "obj",
    [
        [3, K, 0, 1, D],  # no signature
        [3, K, -1, 1, D, S],  # negative view
        [3, K, True, 1, D, S],  # boolean
        [3, K, 0, 1, "digest", S],  # str where bin is due
        [2, K, 0, 1, D, [b""], S],  # empty request
        [2, K, 0, 1, D, [1], S],  # request of the wrong type
        [1, K, b"x" * (MAX_REQUEST_SIZE + 1), S],  # oversized request
        [8, K, 0, 2, 0, 0, S],  # has_view is 0 or 1
        [6, K, 1, 0, D, [], [[0, 1, D, S]], S],  # a prepared certificate of 4 fields
    ],
)
def test_rejects_malformed(obj: list[object]) -> None:
    with pytest.raises(ConsensusDecodeError):
        decode(_pack(obj))


def test_rejects_non_canonical_and_oversized() -> None:
    good = encode(Prepare(K, 5, 1, D, S))
    assert decode(good)
    longer = good.replace(b"\x05", b"\xcc\x05", 1)  # uint8 holding 5
    with pytest.raises(ConsensusDecodeError):
        decode(longer)
    with pytest.raises(ConsensusDecodeError):
        decode(b"\x00" * (MAX_MESSAGE_SIZE + 1))
    with pytest.raises(ConsensusDecodeError):
        decode(good + b"\x00")
    with pytest.raises(ConsensusDecodeError):
        encode(Prepare(K, 5, 1, D))  # unsigned: encode refuses what decode would refuse


def test_rejects_bad_records() -> None:
    with pytest.raises(RecordError):
        decode_record(_pack([2, 7, 0, 1, D]))  # a "vote" of kind CHECKPOINT
    with pytest.raises(RecordError):
        decode_record(_pack([99]))

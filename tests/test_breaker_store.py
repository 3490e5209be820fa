"""Breaker persistence: a real LevelDB store, closed and reopened."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import pytest

from prsm_node.breaker import Action, BreakerParams, BreakerStore, BreakerStoreError, ModelState, StakeTable, Tally
from prsm_node.breaker.store import decode_record, encode_record, record_key
from prsm_node.breaker.votes import encode_vote, sign_vote
from prsm_node.store import Store

CHAIN = "prsm-test"
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(3)]
ACCT = [bytes(k.verify_key) for k in KEYS]
M1, M2 = b"\x01" * 32, b"\x02" * 32
TABLE = StakeTable({ACCT[0]: 100, ACCT[1]: 100, ACCT[2]: 10})


def vote(i: int, model: bytes, action: Action, epoch: int = 1):  # type: ignore[no-untyped-def]
    return sign_vote(
        KEYS[i], chain_id=CHAIN, model=model, action=action, epoch=epoch, timestamp_ms=1000 + epoch, reason="why"
    )


def _snapshot(t: Tally) -> tuple[object, ...]:
    return (
        list(t.votes()),
        {m: t.record(m) for m in t.models()},
        [t.status(m, TABLE) for m in t.models()],
        t.catchup_votes(),
    )


def test_reopen_gives_the_same_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.open()
    bs = BreakerStore(store.namespace("breaker"))
    t = Tally(BreakerParams(), local_voter=ACCT[2])
    for v in [
        vote(0, M1, Action.HALT),
        vote(0, M1, Action.RESUME, epoch=2),  # supersedes; M1 stays halted (hysteresis)
        vote(2, M2, Action.HALT),  # self-halt of M2
        vote(1, M2, Action.RESUME),
    ]:
        t.add(v, TABLE)
        bs.save(t, v.model, v)
    changes = t.recompute(StakeTable({ACCT[0]: 100, ACCT[1]: 100, ACCT[2]: 150}), height=9)
    bs.save_models(t, [m for m, _ in changes])
    # the voter of M2 staked more: M2 halts network-wide on the stake change alone
    assert [(m, c.height) for m, c in changes] == [(M2, 9)]
    assert t.state(M1) is ModelState.HALTED and t.state(M2) is ModelState.HALTED and t.is_halted(M2)
    before = _snapshot(t)
    store.close()

    store = Store(tmp_path / "db")
    store.open()
    loaded = BreakerStore(store.namespace("breaker")).load(BreakerParams(), local_voter=ACCT[2])
    assert _snapshot(loaded) == before
    assert loaded.last_epoch(ACCT[0], M1) == 2
    # and it goes on from there: the resume quorum lifts both
    for v in [vote(1, M1, Action.RESUME), vote(2, M1, Action.RESUME)]:
        loaded.add(v, TABLE)
    assert loaded.state(M1) is ModelState.RUNNING
    store.close()


def test_corrupt_record_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.open()
    ns = store.namespace("breaker")
    ns.put(record_key(M1), b"\x94\x02\x00\x90\x90")  # [2, 0, [], []]: valid
    assert BreakerStore(ns).load(BreakerParams()).state(M1) is ModelState.HALTED
    for bad in [
        b"\x94\x03\x00\x90\x90",
        b"\x94\x02\x02\x90\x90",
        b"\x93\x02\x00\x90",
        b"\xc1",
        b"\x94\x02\xc2\x90\x90",
    ]:
        ns.put(record_key(M1), bad)
        with pytest.raises(BreakerStoreError):
            BreakerStore(ns).load(BreakerParams())
    ns.put(record_key(M1), b"\x94\x02\x00\x90\x90")
    ns.put(b"v" + M1 + ACCT[1], b"\x00")
    with pytest.raises(BreakerStoreError):
        BreakerStore(ns).load(BreakerParams())
    ns.put(b"v" + M1 + ACCT[1], b"")
    ns.put(b"v" + M1 + ACCT[1], vote(0, M1, Action.HALT).__class__.__name__.encode())
    with pytest.raises(BreakerStoreError):
        BreakerStore(ns).load(BreakerParams())
    ns.put(b"v" + M1 + ACCT[1], encode_vote(vote(0, M1, Action.HALT)))  # under voter 1's key
    with pytest.raises(BreakerStoreError):
        BreakerStore(ns).load(BreakerParams())
    store.close()


def test_record_roundtrip() -> None:
    t = Tally(BreakerParams())
    t.add(vote(0, M1, Action.HALT), TABLE)
    record = t.record(M1)
    assert record.evidence and record.changed is not None
    assert decode_record(encode_record(record)) == record

"""The BreakerVote tx kind in the pure ledger core and the mempool: a vote is recorded once,
replays and older epochs are rejected as stale, unstaked voters and forged votes refused,
nothing but the fee moves, and the state hash (incremental and from scratch) covers the
records, through checkpoints and reverts. Property tests with hypothesis."""

from __future__ import annotations

import dataclasses

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.breaker.votes import Action, Vote, sign_vote
from prsm_node.ledger import (
    Account,
    BadSignature,
    BreakerVote,
    InsufficientStake,
    LedgerState,
    StaleVote,
    TxRejected,
    WrongChain,
    decode_tx,
    encode_tx,
    sign_tx,
)
from prsm_node.ledger.exceptions import DuplicateTx
from prsm_node.ledger.mempool import Mempool

CHAIN = "prsm-test-breaker"
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(4)]
ACCTS = [bytes(k.verify_key) for k in KEYS]
MODELS = [bytes([m]) * 32 for m in range(1, 4)]
PROPOSER = bytes(32)


def fresh_state() -> LedgerState:
    # voters 0-2 staked, voter 3 not; everyone can pay fees
    accounts = {a: Account(balance=1000, stake=100 if i < 3 else 0) for i, a in enumerate(ACCTS)}
    return LedgerState(CHAIN, accounts=accounts)


def vote(voter: int, model: int, epoch: int, action: Action = Action.HALT) -> Vote:
    return sign_vote(KEYS[voter], chain_id=CHAIN, model=MODELS[model], action=action, epoch=epoch,
                     timestamp_ms=1_800_000_000_000 + epoch, reason=f"v{voter}")


class Senders:
    """Signs BreakerVote txs with each sender's next nonce."""

    def __init__(self, state: LedgerState) -> None:
        self.state = state

    def tx(self, sender: int, v: Vote, fee: int = 1):  # type: ignore[no-untyped-def]
        nonce = self.state.account(ACCTS[sender]).nonce
        return sign_tx(KEYS[sender], chain_id=CHAIN, nonce=nonce, fee=fee, body=BreakerVote(v))


steps = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2), st.integers(1, 4), st.booleans()),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(steps)
def test_each_vote_recorded_once_stale_rejected_supply_unchanged(plan: list[tuple[int, int, int, int, bool]]) -> None:
    state = fresh_state()
    senders = Senders(state)
    supply = state.total_supply
    expected: dict[tuple[int, int], int] = {}
    height = 1
    for sender, voter, model, epoch, close in plan:
        v = vote(voter, model, epoch)
        tx = decode_tx(encode_tx(senders.tx(sender, v)))  # through the codec, as a block holds it
        before = state.state_hash()
        last = expected.get((voter, model))
        try:
            state.apply(tx, proposer=PROPOSER, height=height)
        except StaleVote:
            assert last is not None and epoch <= last
            assert state.state_hash() == before
        except InsufficientStake:
            assert voter == 3
            assert state.state_hash() == before
        else:
            assert voter != 3 and (last is None or epoch > last)
            expected[(voter, model)] = epoch
            record = state.vote_record(MODELS[model], ACCTS[voter])
            assert record is not None and record.vote == v and record.height == height
        if close:
            state.end_block(height, proposer=PROPOSER)
            state.checkpoint()
            height += 1
        state.check_supply()
        assert state.total_supply == supply  # only fees move, to the proposer
    got = {(ACCTS.index(r.vote.voter), MODELS.index(r.vote.model)): r.vote.epoch for r in state.vote_records()}
    assert got == expected
    assert state.state_hash() == state.recompute_state_hash()


@settings(max_examples=40, deadline=None)
@given(steps)
def test_revert_restores_vote_records_and_hash(plan: list[tuple[int, int, int, int, bool]]) -> None:
    state = fresh_state()
    senders = Senders(state)
    state.apply(senders.tx(0, vote(0, 0, 1)), proposer=PROPOSER, height=1)
    state.end_block(1, proposer=PROPOSER)
    state.checkpoint()
    committed = state.state_hash()
    records = list(state.vote_records())
    for sender, voter, model, epoch, _ in plan:
        try:
            state.apply(senders.tx(sender, vote(voter, model, epoch)), proposer=PROPOSER, height=2)
        except TxRejected:
            pass
    changed = state.changes().votes
    assert all(state.vote_record(k[:32], k[32:]) == r for k, r in changed.items())
    state.revert_to_checkpoint()
    assert state.state_hash() == committed == state.recompute_state_hash()
    assert list(state.vote_records()) == records


def test_wrong_chain_and_forged_votes_are_refused() -> None:
    state = fresh_state()
    senders = Senders(state)
    other = sign_vote(KEYS[0], chain_id="elsewhere", model=MODELS[0], action=Action.HALT, epoch=1, timestamp_ms=1)
    with pytest.raises(WrongChain):
        state.apply(senders.tx(1, other), proposer=PROPOSER, height=1)
    forged = dataclasses.replace(vote(0, 0, 1), signature=bytes(64))
    with pytest.raises(BadSignature):
        state.apply(senders.tx(1, forged), proposer=PROPOSER, height=1)
    # A caller that verified signatures already (verify=False) skips them, as for receipts.
    state.check(senders.tx(1, forged), proposer=PROPOSER, height=1, verify=False)
    assert list(state.vote_records()) == []


def test_mempool_dedups_votes_and_drops_them_once_recorded() -> None:
    state = fresh_state()
    pool = Mempool(state)
    v = vote(0, 0, 2)
    first = sign_tx(KEYS[1], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(v))
    pool.add(first)
    # Another validator submits the same vote: a duplicate, not a second pending tx.
    with pytest.raises(DuplicateTx):
        pool.add(sign_tx(KEYS[2], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(v)))
    with pytest.raises(DuplicateTx):  # an older epoch of the same voter and model, too
        pool.add(sign_tx(KEYS[2], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(vote(0, 0, 1))))
    with pytest.raises(InsufficientStake):
        pool.add(sign_tx(KEYS[2], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(vote(3, 0, 1))))
    # Validator 3 (unstaked itself: only the voter needs stake) queues a newer epoch and a transfer.
    newer = sign_tx(KEYS[3], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(vote(0, 0, 3)))
    pool.add(newer)
    # The vote of ``first`` recorded by a block made elsewhere, with a later epoch too (by
    # another submitter): both pending votes are now stale and go at reconcile.
    state.apply(sign_tx(KEYS[2], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(vote(0, 0, 4))),
                proposer=PROPOSER, height=1)
    state.end_block(1, proposer=PROPOSER)
    state.checkpoint()
    assert pool.reconcile([ACCTS[2]]) == 2
    assert len(pool) == 0
    # And a recorded vote is refused on admission.
    with pytest.raises(StaleVote):
        pool.add(sign_tx(KEYS[1], chain_id=CHAIN, nonce=0, fee=1, body=BreakerVote(vote(0, 0, 4))))

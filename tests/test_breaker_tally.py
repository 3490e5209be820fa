"""The breaker tally: thresholds, hysteresis, supersession, stake changes, self-halt."""

from __future__ import annotations

from fractions import Fraction

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.breaker import (
    Action,
    BreakerParams,
    Cause,
    ModelState,
    Replayed,
    StakeTable,
    Tally,
    Vote,
    sign_vote,
)
from prsm_node.genesis import Genesis
from prsm_node.ledger import LedgerState, Stake, sign_tx

CHAIN = "prsm-test"
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(8)]
ACCT = [bytes(k.verify_key) for k in KEYS]
MODEL = b"\x11" * 32
OTHER_MODEL = b"\x22" * 32
PARAMS = BreakerParams()

_cache: dict[tuple[int, bytes, int, int], Vote] = {}


def v(i: int, action: Action, epoch: int = 1, model: bytes = MODEL) -> Vote:
    """Voter i's vote (cached: signing dominates the property tests otherwise)."""
    key = (i, model, int(action), epoch)
    if key not in _cache:
        _cache[key] = sign_vote(
            KEYS[i], chain_id=CHAIN, model=model, action=action, epoch=epoch, timestamp_ms=epoch, reason=f"r{i}"
        )
    return _cache[key]


def stakes(*amounts: int) -> StakeTable:
    return StakeTable({ACCT[i]: a for i, a in enumerate(amounts)})


def test_halt_needs_the_threshold_exactly() -> None:
    # total 300: 1/3 is exactly 100
    t = Tally(PARAMS)
    table = stakes(99, 1, 200)
    assert t.add(v(0, Action.HALT), table).transition is None
    assert t.state(MODEL) is ModelState.RUNNING and not t.is_halted(MODEL)
    added = t.add(v(1, Action.HALT), table)
    assert added.transition is not None
    assert added.transition.state is ModelState.HALTED and added.transition.vote == v(1, Action.HALT)
    assert (added.transition.halt_stake, added.transition.total_stake) == (100, 300)
    assert t.is_halted(MODEL) and t.halted_models() == [MODEL]
    assert not t.is_halted(OTHER_MODEL)


def test_resume_needs_the_larger_quorum_hysteresis() -> None:
    t = Tally(PARAMS)
    table = stakes(100, 100, 99, 1)  # total 300: 2/3 is 200
    t.add(v(0, Action.HALT), table)
    assert t.state(MODEL) is ModelState.HALTED
    # the halt voter changes its mind: halt stake 0, resume 100 < 200: still halted
    added = t.add(v(0, Action.RESUME, epoch=2), table)
    assert added.superseded == v(0, Action.HALT) and added.transition is None
    assert t.state(MODEL) is ModelState.HALTED
    t.add(v(2, Action.RESUME), table)
    assert t.state(MODEL) is ModelState.HALTED  # 199
    added = t.add(v(3, Action.RESUME), table)  # 200
    assert added.transition is not None and added.transition.state is ModelState.RUNNING
    assert t.record(MODEL).evidence == ()


def test_both_quorums_resume_wins() -> None:
    t = Tally(PARAMS)
    table = stakes(100, 200)
    t.add(v(1, Action.RESUME), table)
    t.add(v(0, Action.HALT), table)
    assert t.state(MODEL) is ModelState.RUNNING


def test_superseded_vote_never_counts_and_replays_are_refused() -> None:
    t = Tally(PARAMS)
    table = stakes(100, 200)
    t.add(v(0, Action.RESUME, epoch=5), table)
    with pytest.raises(Replayed):
        t.add(v(0, Action.HALT, epoch=4), table)
    with pytest.raises(Replayed):
        t.add(v(0, Action.HALT, epoch=5), table)
    assert t.weights(MODEL, table) == (0, 100, 300)
    assert t.last_epoch(ACCT[0], MODEL) == 5 and t.last_epoch(ACCT[1], MODEL) is None


def test_stake_changes_are_honoured() -> None:
    t = Tally(PARAMS)
    t.add(v(0, Action.HALT), stakes(10, 100))
    assert t.state(MODEL) is ModelState.RUNNING
    changes = t.recompute(stakes(50, 100), height=7)
    assert [(m, c.state, c.cause, c.height) for m, c in changes] == [(MODEL, ModelState.HALTED, Cause.STAKE, 7)]
    assert t.status(MODEL, stakes(50, 100)).halt_stake == 50
    # the halt voter unstakes: still halted (hysteresis), and weighs 0 now
    assert t.recompute(stakes(0, 100)) == []
    assert t.state(MODEL) is ModelState.HALTED
    assert t.status(MODEL, stakes(0, 100)).voters[0].stake == 0


def test_no_stake_no_transition() -> None:
    t = Tally(PARAMS)
    t.add(v(0, Action.HALT), StakeTable({}))
    assert t.state(MODEL) is ModelState.RUNNING


def test_status_lists_voters() -> None:
    t = Tally(PARAMS)
    table = stakes(100, 50, 150)
    t.add(v(2, Action.RESUME), table)
    t.add(v(0, Action.HALT), table)
    s = t.status(MODEL, table)
    assert (s.state, s.halted, s.halt_stake, s.resume_stake, s.total_stake) == (ModelState.HALTED, True, 100, 150, 300)
    assert [(x.voter, x.action, x.reason, x.epoch, x.stake) for x in s.voters] == sorted(
        [(ACCT[0], Action.HALT, "r0", 1, 100), (ACCT[2], Action.RESUME, "r2", 1, 150)]
    )
    assert s.changed is not None and s.changed.vote == v(0, Action.HALT)
    assert t.status(OTHER_MODEL, table).state is ModelState.RUNNING


def test_self_halt() -> None:
    table = stakes(1, 100, 100)
    t = Tally(PARAMS, local_voter=ACCT[0])
    added = t.add(v(0, Action.HALT), table)
    assert added.self_halted and added.transition is None
    assert t.is_halted(MODEL) and t.state(MODEL) is ModelState.RUNNING
    # other nodes' tallies are not self-halted
    other = Tally(PARAMS, local_voter=ACCT[1])
    other.add(v(0, Action.HALT), table)
    assert not other.is_halted(MODEL)
    # lifted by the local voter's resume
    assert not t.add(v(0, Action.RESUME, epoch=2), table).self_halted
    assert not t.is_halted(MODEL)
    # lifted by a network-wide HALTED -> RUNNING
    t.add(v(0, Action.HALT, epoch=3), table)
    t.add(v(1, Action.HALT), table)
    assert t.state(MODEL) is ModelState.HALTED
    t.add(v(1, Action.RESUME, epoch=2), table)
    assert t.is_halted(MODEL)
    added = t.add(v(2, Action.RESUME), table)
    assert added.transition is not None and added.transition.state is ModelState.RUNNING
    assert not t.is_halted(MODEL) and not added.self_halted


def test_catchup_votes_carry_the_evidence() -> None:
    table = stakes(100, 100, 100)
    t = Tally(PARAMS)
    t.add(v(0, Action.HALT), table)
    t.add(v(0, Action.RESUME, epoch=2), table)
    assert t.state(MODEL) is ModelState.HALTED
    served = t.catchup_votes()
    assert v(0, Action.HALT) in served and v(0, Action.RESUME, epoch=2) in served
    fresh = Tally(PARAMS)
    for vote in sorted(served, key=lambda x: x.epoch):
        fresh.add(vote, table)
    assert fresh.state(MODEL) is ModelState.HALTED


def test_stake_table_from_ledger() -> None:
    gen = Genesis(chain_id=CHAIN, network="t", genesis_time=0, balances={ACCT[0].hex(): "1000", ACCT[1].hex(): "5"})
    state = LedgerState.from_genesis(gen)
    state.apply(sign_tx(KEYS[0], chain_id=CHAIN, nonce=0, fee=0, body=Stake(300)), proposer=ACCT[0], height=1)
    table = StakeTable.from_ledger(state)
    assert (table.stake_of(ACCT[0]), table.stake_of(ACCT[1]), table.total_stake()) == (300, 0, 300)


# ------------------------------------------------------------ properties

amounts = st.lists(st.integers(min_value=0, max_value=10**30), min_size=1, max_size=8)


def _final(params: BreakerParams, votes: list[Vote], table: StakeTable) -> ModelState:
    t = Tally(params)
    for vote in votes:
        t.add(vote, table)
    return t.state(MODEL)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(stake_list=amounts, actions=st.lists(st.booleans(), min_size=8, max_size=8), data=st.data())
def test_order_of_latest_votes_does_not_matter(stake_list: list[int], actions: list[bool], data: st.DataObject) -> None:
    table = stakes(*stake_list)
    votes = [v(i, Action.HALT if actions[i] else Action.RESUME) for i in range(len(stake_list))]
    shuffled = data.draw(st.permutations(votes))
    assert _final(PARAMS, votes, table) is _final(PARAMS, shuffled, table)
    halt = sum(s for s, a in zip(stake_list, actions, strict=False) if a)
    resume = sum(stake_list) - halt
    total = sum(stake_list)
    expected = (
        ModelState.RUNNING
        if total and 3 * resume >= 2 * total
        else ModelState.HALTED
        if total and 3 * halt >= total
        else ModelState.RUNNING
    )
    assert _final(PARAMS, votes, table) is expected


@settings(max_examples=100, deadline=None, derandomize=True)
@given(stake_list=amounts, epochs=st.lists(st.lists(st.sampled_from([1, 2, 3]), max_size=3), min_size=8, max_size=8))
def test_each_voter_counts_once_with_its_latest_vote(stake_list: list[int], epochs: list[list[int]]) -> None:
    table = stakes(*stake_list)
    t = Tally(PARAMS)
    latest: dict[int, Vote] = {}
    for i in range(len(stake_list)):
        for e in epochs[i]:
            vote = v(i, Action.HALT if e % 2 else Action.RESUME, epoch=e)
            if i in latest and e <= latest[i].epoch:
                with pytest.raises(Replayed):
                    t.add(vote, table)
            else:
                t.add(vote, table)
                latest[i] = vote
    halt = sum(stake_list[i] for i, x in latest.items() if x.action is Action.HALT)
    resume = sum(stake_list[i] for i, x in latest.items() if x.action is Action.RESUME)
    assert t.weights(MODEL, table) == (halt, resume, sum(stake_list))
    assert sorted(t.votes(MODEL), key=lambda x: x.voter) == sorted(latest.values(), key=lambda x: x.voter)
    assert t.vote_count() == len(latest) == sum(1 for _ in t.votes())


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    total=st.integers(min_value=1, max_value=10**24),
    num=st.integers(min_value=1, max_value=50),
    den=st.integers(min_value=1, max_value=50),
)
def test_threshold_is_exact(total: int, num: int, den: int) -> None:
    threshold = Fraction(min(num, den), den)
    params = BreakerParams(halt_threshold=threshold, resume_threshold=Fraction(1))
    need = -(-threshold.numerator * total // threshold.denominator)  # ceil(threshold * total)
    if need > 1:
        assert _final(params, [v(0, Action.HALT)], StakeTable({ACCT[0]: need - 1}, total)) is ModelState.RUNNING
    assert _final(params, [v(0, Action.HALT)], StakeTable({ACCT[0]: need}, total)) is ModelState.HALTED


@settings(max_examples=100, deadline=None, derandomize=True)
@given(stake_list=st.lists(st.integers(min_value=1, max_value=1000), min_size=3, max_size=8), data=st.data())
def test_resume_needs_resume_quorum(stake_list: list[int], data: st.DataObject) -> None:
    table = stakes(*stake_list)
    total = sum(stake_list)
    t = Tally(PARAMS)
    for i in range(len(stake_list)):
        t.add(v(i, Action.HALT), table)
    assert t.state(MODEL) is ModelState.HALTED
    order = data.draw(st.permutations(range(len(stake_list))))
    resumed = 0
    for i in order:
        t.add(v(i, Action.RESUME, epoch=2), table)
        resumed += stake_list[i]
        expected = ModelState.RUNNING if 3 * resumed >= 2 * total else ModelState.HALTED
        assert t.state(MODEL) is expected
        if expected is ModelState.RUNNING:
            break

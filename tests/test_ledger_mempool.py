"""The mempool: admission checks, per-sender nonce order, duplicates, bounds and eviction,
and (hypothesis) that whatever it holds always applies, in its order, as one block."""

from __future__ import annotations

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.genesis import Genesis
from prsm_node.ledger import (
    BadNonce,
    BadSignature,
    InsufficientFunds,
    LedgerState,
    Stake,
    Transfer,
    WrongChain,
    sign_tx,
    tx_hash,
)
from prsm_node.ledger.block import ZERO_HASH, make_block
from prsm_node.ledger.exceptions import DuplicateTx, MempoolFull, TooManyPending
from prsm_node.ledger.exceptions import TxRejected as TxRejectedBase
from prsm_node.ledger.mempool import CommitRate, Mempool
from prsm_node.ledger.types import Tx, Unstake

CHAIN = "prsm-test-mempool"
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(5)]
ACCTS = [bytes(k.verify_key) for k in KEYS]
PROPOSER = b"\x77" * 32


def fresh_state(balance: int = 1000) -> LedgerState:
    gen = Genesis(chain_id=CHAIN, network="t", genesis_time=0, balances={a.hex(): str(balance) for a in ACCTS})
    return LedgerState.from_genesis(gen)


def tx(i: int, nonce: int, amount: int = 10, fee: int = 0, to: int = 4, chain: str = CHAIN) -> Tx:
    return sign_tx(KEYS[i], chain_id=chain, nonce=nonce, fee=fee, body=Transfer(ACCTS[to], amount))


def test_admission_checks_each_rule() -> None:
    pool = Mempool(fresh_state())
    pool.add(tx(0, 0))
    with pytest.raises(DuplicateTx, match="already pending"):
        pool.add(tx(0, 0))
    with pytest.raises(DuplicateTx, match="nonce 0"):
        pool.add(tx(0, 0, amount=11))  # same nonce, another tx: never replaced
    with pytest.raises(BadNonce, match="nonce 5, expected 1"):
        pool.add(tx(0, 5))
    with pytest.raises(WrongChain):
        pool.add(tx(1, 0, chain="prsm-elsewhere"))
    forged = sign_tx(KEYS[2], chain_id=CHAIN, nonce=0, fee=0, body=Transfer(ACCTS[4], 10))
    forged = Tx(forged.chain_id, ACCTS[1], 0, 0, forged.body, forged.signature)
    with pytest.raises(BadSignature):
        pool.add(forged)
    # Balance counts the sender's queue: 1000 - 10 pending leaves 990.
    with pytest.raises(InsufficientFunds):
        pool.add(tx(0, 1, amount=991))
    pool.add(tx(0, 1, amount=990))
    assert pool.next_nonce(ACCTS[0]) == 2 and len(pool) == 2
    assert pool.statistics()["rejected"] == 6


def test_per_sender_limit_and_eviction_by_fee() -> None:
    pool = Mempool(fresh_state(), max_txs=4, max_per_sender=3)
    for n in range(3):
        pool.add(tx(0, n, amount=1, fee=5))
    with pytest.raises(TooManyPending):
        pool.add(tx(0, 3, amount=1, fee=5))
    pool.add(tx(1, 0, amount=1, fee=1))
    with pytest.raises(MempoolFull):
        pool.add(tx(2, 0, amount=1, fee=1))  # does not beat the cheapest (fee 1)
    evictor = pool.add(tx(2, 0, amount=1, fee=2))
    assert evictor.hash in pool and tx_hash(tx(1, 0, amount=1, fee=1)) not in pool
    # The cheapest tail now is sender 2's (fee 2); sender 0's txs (fee 5) stay whole: only a
    # sender's last tx is ever evicted, never one its later txs depend on.
    pool.add(tx(3, 0, amount=1, fee=3))
    assert [p.tx.sender for p in pool.pending()].count(ACCTS[0]) == 3
    assert pool.statistics()["evicted"] == 2


def test_reconcile_after_a_block_drops_used_nonces_and_gaps() -> None:
    state = fresh_state()
    pool = Mempool(state)
    for n in range(3):
        pool.add(tx(0, n))
    pool.add(tx(1, 0))
    # A block takes sender 0's first tx only (as another node's block might).
    make_block(state, [tx(0, 0)], proposer=PROPOSER, prev_hash=ZERO_HASH, time_ms=1)
    state.checkpoint()
    pool.discard([tx_hash(tx(0, 0))])
    assert pool.reconcile() == 0
    assert pool.next_nonce(ACCTS[0]) == 3
    # Now a block that uses nonce 1 with a different tx: pending nonce 1 is stale, 2 still fits.
    make_block(state, [tx(0, 1, amount=3)], proposer=PROPOSER, prev_hash=ZERO_HASH, time_ms=2)
    state.checkpoint()
    assert pool.reconcile([ACCTS[0]]) == 1  # pending nonce 1 is stale; nonce 2 is next now
    assert pool.next_nonce(ACCTS[0]) == 3
    # A block that skips ahead is impossible, but a tx dropped from a block leaves a gap:
    pool.discard([tx_hash(tx(0, 2))])
    pool.add(tx(0, 2, amount=1))
    assert pool.next_nonce(ACCTS[0]) == 3


actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(-1, 2), st.integers(1, 400), st.integers(0, 3)),
        st.tuples(st.just("stake"), st.integers(0, 3), st.integers(1, 300)),
        st.tuples(st.just("block"), st.integers(0, 12)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(actions)
def test_pending_txs_always_apply_in_order(plan) -> None:  # type: ignore[no-untyped-def]
    """Whatever random txs arrive (good, overdrawn, future or stale nonces), the pool's
    content, taken in order, applies as one block without a single rejection; per sender
    the nonces are contiguous from the account's nonce; and the bounds hold."""
    state = fresh_state()
    pool = Mempool(state, max_txs=25, max_per_sender=6)
    height_time = 0
    for action in plan:
        if action[0] in ("add", "stake"):
            sender = action[1]
            nonce = pool.next_nonce(ACCTS[sender]) + (action[2] if action[0] == "add" else 0)
            if action[0] == "add":
                candidate = tx(sender, max(nonce, 0), amount=action[3], fee=action[4])
            else:
                candidate = sign_tx(KEYS[sender], chain_id=CHAIN, nonce=nonce, fee=0, body=Stake(action[2]))
            try:
                pool.add(candidate)
            except (BadNonce, InsufficientFunds, DuplicateTx, MempoolFull, TooManyPending):
                pass
        else:
            height_time += 1
            txs = pool.select(action[1])
            block, included, dropped = make_block(
                state, txs, proposer=PROPOSER, prev_hash=ZERO_HASH, time_ms=height_time
            )
            state.checkpoint()
            assert dropped == []
            pool.discard(tx_hash(t) for t in included)
            pool.reconcile()
        assert len(pool) <= 25
        by_sender: dict[bytes, list[int]] = {}
        for p in pool.pending():
            by_sender.setdefault(p.tx.sender, []).append(p.tx.nonce)
        for sender, nonces in by_sender.items():
            base = state.account(sender).nonce
            assert nonces == list(range(base, base + len(nonces)))
            assert len(nonces) <= 6
        # the running per-sender totals that make admission O(1) match a recount
        recount: dict[bytes, list[int]] = {}
        for p in pool.pending():
            t = recount.setdefault(p.tx.sender, [0, 0, 0])
            body = p.tx.body
            t[0] += p.tx.fee + (body.amount if isinstance(body, Transfer | Stake) else 0)
            t[1] += body.amount if isinstance(body, Stake) else -body.amount if isinstance(body, Unstake) else 0
        assert pool._queued == recount
    before = state.state_hash()
    _, included, dropped = make_block(state, pool.select(10**6), proposer=PROPOSER, prev_hash=ZERO_HASH, time_ms=0)
    assert dropped == [] and len(included) == len(pool)
    state.revert_to_checkpoint()
    assert state.state_hash() == before


def test_eviction_never_takes_the_newcomers_own_last_tx() -> None:
    """Evicting the submitting sender's own tail would leave a gap just before its new tx."""
    pool = Mempool(fresh_state(), max_txs=2)
    pool.add(tx(0, 0, fee=1))
    pool.add(tx(1, 0, fee=5))
    with pytest.raises(MempoolFull):
        pool.add(tx(0, 1, fee=3))  # sender 0's own fee-1 tx is not a candidate; sender 1's costs more
    pool.add(tx(0, 1, fee=6))  # evicts sender 1's tx
    assert [p.tx.sender for p in pool.pending()] == [ACCTS[0], ACCTS[0]]
    assert pool.next_nonce(ACCTS[0]) == 2


def forge(t: Tx) -> Tx:
    return Tx(t.chain_id, t.sender, t.nonce, t.fee, t.body, bytes(64))


batch_items = st.lists(
    st.tuples(st.integers(0, 3), st.integers(-2, 4), st.integers(1, 400), st.integers(0, 2), st.booleans()),
    max_size=30,
)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 50)), max_size=8), batch_items)
def test_precheck_refuses_only_what_add_would_refuse(before, batch) -> None:  # type: ignore[no-untyped-def]
    """A submission checked by ``precheck`` and then added in order ends as adding every tx
    in order would (the same txs admitted, the same kind of refusal but for second copies),
    whatever the mix of forged signatures, duplicates, stale, repeated and skipped nonces."""
    state = fresh_state()
    pools = [Mempool(state, max_per_sender=5), Mempool(state, max_per_sender=5)]
    for sender, amount in before:
        for pool in pools:
            if len(pool._by_sender.get(ACCTS[sender], {})) < pool.max_per_sender:
                pool.add(tx(sender, pool.next_nonce(ACCTS[sender]), amount=amount))
    txs = []
    for sender, offset, amount, fee, forged in batch:
        t = tx(sender, max(0, pools[0].next_nonce(ACCTS[sender]) + offset), amount=amount, fee=fee)
        txs.append(forge(t) if forged else t)
        if offset == 4:
            txs.append(txs[-1])  # the same tx twice in one submission

    def outcome(pool: Mempool, t: Tx) -> str:
        try:
            pool.add(t)
        except TxRejectedBase as exc:
            return type(exc).__name__
        return "admitted"

    plain = [outcome(pools[0], t) for t in txs]
    checked = [
        type(refused).__name__ if refused is not None else outcome(pools[1], t)
        for t, refused in zip(txs, pools[1].precheck(txs), strict=True)
    ]
    slot = {"DuplicateTx", "BadNonce", "TooManyPending"}
    for i, (c, p) in enumerate(zip(checked, plain, strict=True)):
        # Precheck assumes the sender's earlier txs in the submission get in; when one of them
        # then fails, a later one is refused for its nonce slot under another name (a second
        # copy as a duplicate, a queue overflow where add sees the gap). Otherwise the same.
        earlier = any(t.sender == txs[i].sender for t in txs[:i])
        assert c == p or (c in slot and p != "admitted" and earlier)
    assert [p.hash for p in pools[1].pending()] == [p.hash for p in pools[0].pending()]


def test_precheck_turns_a_full_mempool_and_nonce_gaps_away() -> None:
    pool = Mempool(fresh_state(), max_txs=3)
    pool.add(tx(0, 0))
    refused = pool.precheck([tx(1, 0), tx(1, 1), tx(1, 3), tx(2, 0), tx(2, 1, fee=2), tx(0, 0)])
    assert [type(r).__name__ if r else None for r in refused] == [
        None,  # room for two more at the minimum fee
        None,
        "BadNonce",  # nonce 3 skips 2
        "MempoolFull",  # the third newcomer at the minimum fee
        "BadNonce",  # sender 2's nonce 0 was refused, so nonce 1 is a gap
        "DuplicateTx",  # pending already
    ]
    assert "only a fee above 0" in str(refused[3])


def test_precheck_holds_the_backlog_to_the_limit_but_lets_a_higher_fee_past_it() -> None:
    pool = Mempool(fresh_state(), max_txs=10)
    pool.add(tx(0, 0))
    refused = pool.precheck([tx(1, 0), tx(2, 0), tx(3, 0, fee=1)], limit=2)
    assert [type(r).__name__ if r else None for r in refused] == [None, "MempoolFull", None]
    assert "the network is busy" in str(refused[1])
    assert pool.precheck([tx(1, 0), tx(2, 0)], limit=50) == [None, None]  # max_txs still caps a large limit


def test_commit_rate_limit_follows_recent_commits_within_floor_and_ceiling() -> None:
    rate = CommitRate(floor=100, ceiling=5000, backlog_seconds=3.0, window=10.0)
    assert rate.limit(0.0) == 100  # nothing committed yet: one block's worth
    for t in range(1, 11):
        rate.committed(float(t), 500)  # 500 txs a second
    assert rate.rate(10.0) == pytest.approx(5000 / 9)
    assert rate.limit(10.0) == 1666
    rate.committed(10.5, 100_000)
    assert rate.limit(10.5) == 5000  # never past the ceiling (the mempool's size)
    assert rate.limit(30.0) == 100  # the window emptied: back to the floor
    rate.committed(31.0, 50)
    assert rate.rate(31.0) == 50.0  # one block just now counts over at least a second


@given(
    blocks=st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 4096)), max_size=40),
    floor=st.integers(1, 4096),
    ceiling=st.integers(1, 20_000),
)
def test_commit_rate_limit_stays_within_its_bounds(blocks, floor, ceiling) -> None:  # type: ignore[no-untyped-def]
    rate = CommitRate(floor=floor, ceiling=ceiling)
    now = 0.0
    for gap, txs in blocks:
        now += gap
        rate.committed(now, txs)
        assert floor <= rate.limit(now) <= max(floor, ceiling)
        assert rate.rate(now) >= 0

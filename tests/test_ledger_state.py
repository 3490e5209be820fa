"""LedgerState rules, one at a time: each rejection is a specific error and changes nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import nacl.signing
import pytest

from prsm_node.genesis import Genesis
from prsm_node.ledger import (
    MAX_AMOUNT,
    Account,
    AmountOutOfRange,
    BadNonce,
    BadSignature,
    BlockContextError,
    FeeTooLow,
    GenesisError,
    InsufficientFunds,
    InsufficientStake,
    LedgerError,
    LedgerParams,
    LedgerState,
    MalformedTx,
    Receipt,
    ReceiptAlreadySettled,
    ReceiptPayeeMismatch,
    Settle,
    Stake,
    SupplyViolation,
    Transfer,
    Tx,
    TxRejected,
    Unstake,
    WrongChain,
    receipt_key,
    sign_receipt,
    sign_tx,
)
from prsm_node.ledger.types import Body

CHAIN = "prsm-test"
KEYS = {n: nacl.signing.SigningKey(bytes([i + 1]) * 32) for i, n in enumerate(["alice", "bob", "carol", "prop"])}
A, B, C, P = (bytes(k.verify_key) for k in KEYS.values())
PARAMS = LedgerParams(unbonding_blocks=3, min_fee=2, block_reward=0)


def make_state(params: LedgerParams = PARAMS, **balances: int) -> LedgerState:
    funded = balances or {"alice": 1000, "bob": 100}
    acct = {bytes(KEYS[n].verify_key): Account(balance=v) for n, v in funded.items()}
    return LedgerState(CHAIN, params, accounts=acct)


def tx(who: str, body: Body, *, nonce: int = 0, fee: int = 2, chain: str = CHAIN) -> Tx:
    return sign_tx(KEYS[who], chain_id=chain, nonce=nonce, fee=fee, body=body)


def receipt(payer: str, payee: bytes, amount: int, rid: int = 1, chain: str = CHAIN) -> Receipt:
    return sign_receipt(KEYS[payer], receipt_id=rid.to_bytes(32, "big"), payee=payee, amount=amount, chain_id=chain)


def snapshot(state: LedgerState) -> tuple[object, ...]:
    return state.state_hash(), list(state.accounts()), list(state.settled_receipts()), state.height


def rejects(state: LedgerState, t: Tx, error: type[TxRejected], match: str | None = None) -> None:
    before = snapshot(state)
    with pytest.raises(error, match=match):
        state.check(t, proposer=P, height=state.height + 1)
    with pytest.raises(error, match=match):
        state.apply(t, proposer=P, height=state.height + 1)
    assert snapshot(state) == before
    assert state.state_hash() == state.recompute_state_hash()


# ------------------------------------------------------------ genesis


def test_from_genesis() -> None:
    g = Genesis(
        chain_id=CHAIN,
        network="test",
        genesis_time=0,
        balances={A.hex(): "1000", B.hex(): "0"},
        params={"unbonding_blocks": "5", "min_fee": 3, "block_reward": "7", "decimals": 18},
    )
    s = LedgerState.from_genesis(g)
    assert s.account(A) == Account(balance=1000) and s.account(B) == Account()
    assert [k for k, _ in s.accounts()] == [A]
    assert s.params == LedgerParams(unbonding_blocks=5, min_fee=3, block_reward=7)
    assert s.total_supply == s.genesis_supply == 1000 and s.height == 0 and s.minted == 0
    defaults = LedgerState.from_genesis(dataclasses.replace(g, params={}))
    assert defaults.params == LedgerParams(unbonding_blocks=10, min_fee=0, block_reward=0)


@pytest.mark.parametrize(
    ("balances", "params", "match"),
    [
        ({"zz" * 32: "1"}, {}, "lowercase hex"),
        ({A.hex().upper(): "1"}, {}, "lowercase hex"),
        ({A.hex()[:-2]: "1"}, {}, "lowercase hex"),
        ({A.hex(): "-1"}, {}, "decimal integer"),
        ({A.hex(): "1.5"}, {}, "decimal integer"),
        ({A.hex(): 5}, {}, "decimal integer"),
        ({A.hex(): str(MAX_AMOUNT), B.hex(): "1"}, {}, "2\\*\\*128"),
        ({}, {"unbonding_blocks": -1}, "unbonding_blocks"),
        ({}, {"unbonding_blocks": True}, "unbonding_blocks"),
        ({}, {"min_fee": "1.5"}, "min_fee"),
        ({}, {"block_reward": 2**128}, "block_reward"),
    ],
)
def test_bad_genesis(balances: dict[str, str], params: dict[str, object], match: str) -> None:
    g = Genesis(chain_id=CHAIN, network="t", genesis_time=0, balances=balances, params=params)
    with pytest.raises(GenesisError, match=match):
        LedgerState.from_genesis(g)


def test_bad_chain_id() -> None:
    with pytest.raises(GenesisError, match="chain_id"):
        LedgerState("x" * 65)


# ------------------------------------------------------------ transfer, fees, nonces


def test_transfer_moves_amount_and_pays_fee_to_proposer() -> None:
    s = make_state()
    s.apply(tx("alice", Transfer(C, 300), fee=5), proposer=P, height=1)
    assert s.account(A) == Account(balance=695, nonce=1)
    assert s.account(C) == Account(balance=300)
    assert s.account(P) == Account(balance=5)
    assert s.total_supply == 1100
    s.check_supply()
    assert s.state_hash() == s.recompute_state_hash()


def test_self_transfer_and_proposer_as_sender() -> None:
    s = make_state()
    s.apply(tx("alice", Transfer(A, 998)), proposer=A, height=1)
    assert s.account(A) == Account(balance=1000, nonce=1)
    rejects(s, tx("alice", Transfer(A, 999), nonce=1), InsufficientFunds, "amount 999 \\+ fee 2")


def test_nonce_rules() -> None:
    s = make_state()
    first = tx("alice", Transfer(B, 1))
    s.apply(first, proposer=P, height=1)
    with pytest.raises(BadNonce) as replay:
        s.apply(first, proposer=P, height=1)
    assert (replay.value.account, replay.value.expected, replay.value.got) == (A, 1, 0)
    assert A.hex() in str(replay.value)
    rejects(s, tx("alice", Transfer(B, 1), nonce=2), BadNonce, "nonce 2, expected 1")
    s.apply(tx("alice", Transfer(B, 1), nonce=1), proposer=P, height=1)
    assert s.account(A).nonce == 2


def test_fee_below_minimum() -> None:
    rejects(make_state(), tx("alice", Transfer(B, 1), fee=1), FeeTooLow, "fee 1 is below the minimum fee 2")


def test_insufficient_funds_names_account_and_amounts() -> None:
    s = make_state()
    rejects(s, tx("bob", Transfer(A, 99)), InsufficientFunds, f"{B.hex()}.*balance 100.*amount 99 \\+ fee 2")
    rejects(s, tx("carol", Transfer(A, 1)), InsufficientFunds)  # an unknown account has nothing
    s.apply(tx("bob", Transfer(A, 98)), proposer=P, height=1)
    assert s.account(B) == Account(balance=0, nonce=1)


def test_wrong_chain() -> None:
    rejects(make_state(), tx("alice", Transfer(B, 1), chain="prsm-other"), WrongChain, "prsm-other")


def test_bad_signature() -> None:
    s = make_state()
    good = tx("alice", Transfer(B, 1))
    forged = dataclasses.replace(good, body=Transfer(B, 500))
    rejects(s, forged, BadSignature, f"{A.hex()} nonce 0")
    rejects(s, dataclasses.replace(good, signature=bytes(64)), BadSignature)
    signed_by_bob = dataclasses.replace(tx("bob", Transfer(B, 1)), sender=A)
    rejects(s, signed_by_bob, BadSignature)
    s.apply(forged, proposer=P, height=1, verify=False)  # blocks whose txs were verified before
    assert s.account(B).balance == 600


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (Transfer(B, 0), AmountOutOfRange),
        (Transfer(B, -1), AmountOutOfRange),
        (Transfer(B, MAX_AMOUNT + 1), AmountOutOfRange),
        (Stake(0), AmountOutOfRange),
        (Unstake(0), AmountOutOfRange),
        (Transfer(B[:5], 1), MalformedTx),
        (Settle(()), MalformedTx),
    ],
)
def test_amount_and_shape_errors(body: Body, error: type[TxRejected]) -> None:
    s = make_state()
    rejects(s, Tx(CHAIN, A, 0, 2, body, bytes(64)), error)


def test_fee_overflow_rejected() -> None:
    rejects(make_state(), Tx(CHAIN, A, 0, MAX_AMOUNT + 1, Transfer(B, 1), bytes(64)), AmountOutOfRange, "fee")
    rejects(make_state(), Tx(CHAIN, A, 0, -3, Transfer(B, 1), bytes(64)), AmountOutOfRange, "fee")


# ------------------------------------------------------------ staking


def test_stake_unstake_and_release() -> None:
    s = make_state()
    s.apply(tx("alice", Stake(500)), proposer=P, height=1)
    assert s.account(A) == Account(balance=498, nonce=1, stake=500)
    s.apply(tx("alice", Unstake(100), nonce=1), proposer=P, height=1)
    s.apply(tx("alice", Unstake(50), nonce=2), proposer=P, height=1)  # same release height: merged
    assert s.account(A).unbonding == ((150, 4),)
    rejects(s, tx("alice", Unstake(351), nonce=3), InsufficientStake, "stake 350 does not cover unstake 351")
    for h in (1, 2, 3):
        assert s.end_block(h, proposer=P).released == ()
    s.apply(tx("alice", Unstake(10), nonce=3), proposer=P, height=4)
    end = s.end_block(4, proposer=P)
    assert end.released == ((A, 150),)
    assert s.account(A) == Account(balance=492 + 150, nonce=4, stake=340, unbonding=((10, 7),))
    s.check_supply()
    assert s.state_hash() == s.recompute_state_hash()


def test_stake_needs_amount_plus_fee_and_unstake_needs_fee() -> None:
    s = make_state()
    rejects(s, tx("bob", Stake(99)), InsufficientFunds)
    s.apply(tx("bob", Stake(98)), proposer=P, height=1)
    rejects(s, tx("bob", Unstake(98), nonce=1), InsufficientFunds, "fee 2")


def test_unbonding_blocks_zero_releases_at_the_same_block() -> None:
    s = make_state(LedgerParams(unbonding_blocks=0))
    s.apply(tx("alice", Stake(10), fee=0), proposer=P, height=1)
    s.apply(tx("alice", Unstake(10), nonce=1, fee=0), proposer=P, height=1)
    assert s.end_block(1, proposer=P).released == ((A, 10),)
    assert s.account(A) == Account(balance=1000, nonce=2)


# ------------------------------------------------------------ settle


def test_settle_pays_each_receipt_once() -> None:
    s = make_state()
    r1, r2 = receipt("alice", B, 40, rid=1), receipt("alice", B, 60, rid=2)
    s.apply(tx("bob", Settle((r1, r2))), proposer=P, height=1)
    assert s.account(A).balance == 900 and s.account(B) == Account(balance=198, nonce=1)
    assert s.is_settled(A, r1.receipt_id) and s.is_settled(A, r2.receipt_id)
    rejects(s, tx("bob", Settle((r1,)), nonce=1), ReceiptAlreadySettled, "already settled")
    rejects(s, tx("bob", Settle((receipt("alice", B, 1, rid=3),) * 2), nonce=1), ReceiptAlreadySettled, "twice")


def test_receipt_ids_are_per_payer() -> None:
    s = make_state(alice=100, carol=100)
    s.apply(tx("bob", Settle((receipt("alice", B, 10, rid=7),)), fee=2), proposer=P, height=1)
    s.apply(tx("bob", Settle((receipt("carol", B, 10, rid=7),)), nonce=1), proposer=P, height=1)
    assert sorted(s.settled_receipts()) == sorted(
        [receipt_key(A, (7).to_bytes(32, "big")), receipt_key(C, (7).to_bytes(32, "big"))]
    )


def test_settle_fee_may_come_from_proceeds() -> None:
    s = make_state(alice=100)
    s.apply(tx("carol", Settle((receipt("alice", C, 10),))), proposer=P, height=1)
    assert s.account(C) == Account(balance=8, nonce=1) and s.account(P).balance == 2
    rejects(s, tx("carol", Settle((receipt("alice", C, 1, rid=2),)), nonce=1, fee=20), InsufficientFunds, "fee 20")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: receipt("alice", C, 5), ReceiptPayeeMismatch, "not the sender"),
        (lambda: receipt("alice", B, 5, chain="prsm-other"), WrongChain, "receipt .* is for chain 'prsm-other'"),
        (lambda: receipt("alice", B, 1001), InsufficientFunds, f"{A.hex()}.*balance 1000"),
        (lambda: receipt("carol", B, 1), InsufficientFunds, C.hex()),
        (lambda: dataclasses.replace(receipt("alice", B, 5), amount=500), BadSignature, "not signed by its payer"),
        (lambda: dataclasses.replace(receipt("alice", B, 5), payer=B), BadSignature, "not signed by its payer"),
        (lambda: dataclasses.replace(receipt("alice", B, 5), amount=0), AmountOutOfRange, "positive"),
    ],
)
def test_bad_receipts(make: Callable[[], Receipt], error: type[TxRejected], match: str) -> None:
    s = make_state()
    rejects(s, tx("bob", Settle((make(),))), error, match)
    assert not s.is_settled(A, (1).to_bytes(32, "big"))


def test_payer_balance_covers_all_its_receipts() -> None:
    s = make_state(alice=50, bob=10)
    both = Settle((receipt("alice", B, 30, rid=1), receipt("alice", B, 30, rid=2)))
    rejects(s, tx("bob", both), InsufficientFunds)


# ------------------------------------------------------------ blocks, supply, journal


def test_height_and_proposer_checks() -> None:
    s = make_state()
    t = tx("alice", Transfer(B, 1))
    with pytest.raises(BlockContextError, match="height 2"):
        s.apply(t, proposer=P, height=2)
    with pytest.raises(BlockContextError, match="proposer"):
        s.apply(t, proposer=P[:31], height=1)
    with pytest.raises(BlockContextError):
        s.end_block(0, proposer=P)
    s.end_block(1, proposer=P)
    with pytest.raises(BlockContextError):
        s.apply(t, proposer=P, height=1)


def test_block_reward_is_minted_and_capped() -> None:
    s = make_state(LedgerParams(block_reward=7))
    assert s.end_block(1, proposer=P).minted == 7
    assert s.account(P).balance == 7 and s.minted == 7 and s.total_supply == 1107
    s.check_supply()
    near_max = LedgerState(CHAIN, LedgerParams(block_reward=7), accounts={A: Account(balance=MAX_AMOUNT - 3)})
    assert near_max.end_block(1, proposer=P).minted == 3
    assert near_max.end_block(2, proposer=P).minted == 0
    assert near_max.total_supply == MAX_AMOUNT


def test_check_supply_detects_tampering() -> None:
    s = make_state()
    s._accounts[A] = Account(balance=1001)  # noqa: SLF001 - simulating a bug
    with pytest.raises(SupplyViolation, match="accounts hold 1101, the running total says 1100"):
        s.check_supply()
    # A bug that changes the running total and the accounts alike: the per-block check sees it.
    t = make_state()
    t._put(A, Account(balance=1001))  # noqa: SLF001 - simulating a bug (one unit from nowhere)
    with pytest.raises(SupplyViolation, match="expected genesis supply 1100"):
        t.check_block_supply()
    with pytest.raises(SupplyViolation, match="expected genesis supply 1100"):
        t.check_supply()


def test_check_supply_detects_negative_amounts() -> None:
    with pytest.raises(SupplyViolation, match=f"negative.*{A.hex()}"):
        LedgerState(CHAIN, accounts={A: Account(balance=10, stake=-5), B: Account(balance=5)})
    s = make_state()
    s._accounts[A] = Account(balance=1005, unbonding=((-5, 9),))  # noqa: SLF001 - simulating a bug
    with pytest.raises(SupplyViolation, match="negative"):
        s.check_supply()


def test_constructor_rejects_bad_snapshots() -> None:
    with pytest.raises(LedgerError, match="32 bytes"):
        LedgerState(CHAIN, accounts={A[:31]: Account(balance=1)})
    with pytest.raises(LedgerError, match="64 bytes"):
        LedgerState(CHAIN, settled=[b"short"])
    with pytest.raises(LedgerError, match="unbonding"):
        LedgerState(CHAIN, accounts={A: Account(unbonding=((1, 5), (1, 5)))}, height=1)
    with pytest.raises(LedgerError, match="unbonding"):
        LedgerState(CHAIN, accounts={A: Account(unbonding=((1, 3),))}, height=3)
    with pytest.raises(SupplyViolation):
        LedgerState(CHAIN, accounts={A: Account(balance=5)}, genesis_supply=4)


def test_state_hash_binds_chain_height_and_contents() -> None:
    s1, s2 = make_state(), make_state()
    assert s1.state_hash() == s2.state_hash()
    assert (
        LedgerState("prsm-x", PARAMS, accounts={A: Account(balance=1000), B: Account(balance=100)}).state_hash()
        != s1.state_hash()
    )
    s1.end_block(1, proposer=P)
    assert s1.state_hash() != s2.state_hash() and s1.state_hash() == s1.recompute_state_hash()
    s2.apply(tx("alice", Transfer(B, 1)), proposer=P, height=1)
    s2.end_block(1, proposer=P)
    assert s1.state_hash() != s2.state_hash()


def test_snapshot_rebuilds_the_same_state() -> None:
    s = make_state(LedgerParams(block_reward=5))
    s.apply(tx("bob", Settle((receipt("alice", B, 5),))), proposer=P, height=1)
    s.apply(tx("alice", Stake(100)), proposer=P, height=1)
    s.apply(tx("alice", Unstake(30), nonce=1), proposer=P, height=1)
    s.end_block(1, proposer=P)
    copy = LedgerState(
        CHAIN, s.params, accounts=dict(s.accounts()), settled=s.settled_receipts(), height=s.height, minted=s.minted
    )
    assert copy.state_hash() == s.state_hash() and copy.total_supply == s.total_supply
    for h in (2, 3, 4):
        assert copy.end_block(h, proposer=P).released == s.end_block(h, proposer=P).released
    assert copy.state_hash() == s.state_hash()


def test_journal_changes_and_revert() -> None:
    s = make_state(LedgerParams(block_reward=5))
    s.apply(tx("alice", Transfer(C, 10)), proposer=P, height=1)
    s.end_block(1, proposer=P)
    s.checkpoint()
    saved = snapshot(s)
    assert s.changes().accounts == {} and s.changes().settled == frozenset()
    s.apply(tx("bob", Settle((receipt("alice", B, 5),))), proposer=P, height=2)
    s.apply(tx("alice", Stake(100), nonce=1), proposer=C, height=2)
    s.end_block(2, proposer=B)
    ch = s.changes()
    assert set(ch.accounts) == {A, B, C, P} and ch.height == 2 and ch.minted == 10
    assert ch.settled == {receipt_key(A, (1).to_bytes(32, "big"))} and ch.accumulator == s.accumulator
    s.revert_to_checkpoint()
    assert snapshot(s) == saved and s.minted == 5
    assert s.state_hash() == s.recompute_state_hash()
    s.check_supply()
    s.apply(tx("bob", Settle((receipt("alice", B, 5),))), proposer=P, height=2)  # settles again after revert

"""A hypothesis state machine over a few accounts, checked against a plain reference model.

Random transfers, stakes, unstakes, receipts, settles, block ends and block aborts, valid
and invalid (wrong nonce, wrong chain, forged signature, overdraft, replays, receipts settled
twice). After every step: the outcome (applied, or the exact TxRejected subclass) is the
model's; a rejected tx left the state hash unchanged; accounts and settled receipts equal the
model's; supply == genesis + minted; nothing is negative; the incremental state hash equals a
from-scratch one; and a twin LedgerState fed the same accepted txs (with verify=False) has the
same state hash.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import nacl.signing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from prsm_node.ledger import (
    MAX_AMOUNT,
    Account,
    AmountOutOfRange,
    BadNonce,
    BadSignature,
    FeeTooLow,
    InsufficientFunds,
    InsufficientStake,
    LedgerParams,
    LedgerState,
    Receipt,
    ReceiptAlreadySettled,
    ReceiptPayeeMismatch,
    Settle,
    Stake,
    Transfer,
    Tx,
    TxRejected,
    Unstake,
    WrongChain,
    sign_receipt,
    sign_tx,
)
from prsm_node.ledger.types import Body

CHAIN = "prsm-stateful"
NAMES = ["alice", "bob", "carol", "dave"]
KEYS = {n: nacl.signing.SigningKey(bytes([i + 1]) * 32) for i, n in enumerate(NAMES)}
ACCT = {n: bytes(k.verify_key) for n, k in KEYS.items()}
MALLORY = nacl.signing.SigningKey(b"\x66" * 32)  # signs forgeries
GENESIS = {"alice": 1000, "bob": 300, "carol": 0, "dave": 40}

names = st.sampled_from(NAMES)
small = st.integers(min_value=1, max_value=60) | st.integers(min_value=0, max_value=1200)
# One fault at most per tx, most txs none: "none" comes first, so it is also what shrinking picks.
faults = st.sampled_from(["none"] * 12 + ["fee", "chain", "nonce-", "nonce+", "forge"])


@dataclass
class ModelAccount:
    balance: int = 0
    nonce: int = 0
    stake: int = 0
    unbonding: list[list[int]] = field(default_factory=list)

    def frozen(self) -> Account:
        return Account(self.balance, self.nonce, self.stake, tuple((a, h) for a, h in self.unbonding))


@dataclass
class Model:
    """The ledger rules written as plainly as possible, in the spec's check order."""

    params: LedgerParams
    accounts: dict[bytes, ModelAccount] = field(default_factory=dict)
    settled: set[bytes] = field(default_factory=set)
    height: int = 0
    minted: int = 0

    def get(self, key: bytes) -> ModelAccount:
        return self.accounts.setdefault(key, ModelAccount())

    def run(self, tx: Tx, proposer: bytes, sig_ok: bool, receipts_ok: list[bool]) -> type[TxRejected] | None:
        height = self.height + 1
        if tx.chain_id != CHAIN:
            return WrongChain
        s = self.get(tx.sender)
        if tx.nonce != s.nonce:
            return BadNonce
        if tx.fee < self.params.min_fee:
            return FeeTooLow
        body = tx.body
        if isinstance(body, Transfer | Stake | Unstake) and body.amount <= 0:
            return AmountOutOfRange
        if isinstance(body, Transfer):
            if s.balance < body.amount + tx.fee:
                return InsufficientFunds
            s.balance -= body.amount
            self.get(body.to).balance += body.amount
        elif isinstance(body, Stake):
            if s.balance < body.amount + tx.fee:
                return InsufficientFunds
            s.balance -= body.amount
            s.stake += body.amount
        elif isinstance(body, Unstake):
            if s.stake < body.amount:
                return InsufficientStake
            s.stake -= body.amount
            release = height + self.params.unbonding_blocks
            if s.unbonding and s.unbonding[-1][1] == release:
                s.unbonding[-1][0] += body.amount
            else:
                s.unbonding.append([body.amount, release])
        else:
            seen: set[bytes] = set()
            for r in body.receipts:
                key = r.payer + r.receipt_id
                if r.amount <= 0:
                    return AmountOutOfRange
                if r.chain_id != CHAIN:
                    return WrongChain
                if r.payee != tx.sender:
                    return ReceiptPayeeMismatch
                if key in seen or key in self.settled:
                    return ReceiptAlreadySettled
                seen.add(key)
                if self.get(r.payer).balance < r.amount:
                    return InsufficientFunds
                self.get(r.payer).balance -= r.amount
                self.get(r.payee).balance += r.amount
            self.settled |= seen
        if s.balance < tx.fee:
            return InsufficientFunds
        s.balance -= tx.fee
        self.get(proposer).balance += tx.fee
        s.nonce += 1
        if not sig_ok or not all(receipts_ok):
            return BadSignature
        return None

    def end_block(self, proposer: bytes) -> None:
        self.height += 1
        for a in self.accounts.values():
            a.balance += sum(x for x, h in a.unbonding if h <= self.height)
            a.unbonding = [[x, h] for x, h in a.unbonding if h > self.height]
        total = sum(a.frozen().total for a in self.accounts.values())
        mint = min(self.params.block_reward, MAX_AMOUNT - total)
        self.get(proposer).balance += mint
        self.minted += mint

    def frozen(self) -> dict[bytes, Account]:
        return {k: a.frozen() for k, a in self.accounts.items() if not a.frozen().is_empty}


def new_state(params: LedgerParams) -> LedgerState:
    return LedgerState(CHAIN, params, accounts={ACCT[n]: Account(balance=v) for n, v in GENESIS.items()})


class LedgerMachine(RuleBasedStateMachine):
    receipts = Bundle("receipts")
    params = LedgerParams(unbonding_blocks=1, min_fee=1, block_reward=3)

    @initialize()
    def setup(self) -> None:
        self.state = new_state(self.params)
        self.twin = new_state(self.params)
        self.model = Model(self.params, accounts={ACCT[n]: ModelAccount(balance=v) for n, v in GENESIS.items() if v})
        self.saved_model = copy.deepcopy(self.model)
        self.applied: list[Tx] = []
        self.saved_applied = 0
        self.saved_settled = 0
        self.receipt_counter = 0
        self.receipt_sig_ok: dict[Receipt, bool] = {}
        self.settled: list[Receipt] = []  # receipts of applied Settle txs (a revert may unsettle them)

    def _submit(self, sender: str, body: Body, fault: str, proposer: str) -> None:
        shift = {"nonce-": -1, "nonce+": 1}.get(fault, 0)
        nonce = max(0, self.state.account(ACCT[sender]).nonce + shift)
        fee = 0 if fault == "fee" else 1 + nonce % 3
        chain = "prsm-other" if fault == "chain" else CHAIN
        forge = fault == "forge"
        t = sign_tx(MALLORY if forge else KEYS[sender], chain_id=chain, nonce=nonce, fee=fee, body=body)
        self._run(dataclasses.replace(t, sender=ACCT[sender]), proposer, forge)

    def _run(self, t: Tx, proposer: str, forge: bool = False) -> None:
        receipts_ok = [self.receipt_sig_ok[r] for r in t.body.receipts] if isinstance(t.body, Settle) else []
        trial = copy.deepcopy(self.model)
        expected = trial.run(t, ACCT[proposer], not forge, receipts_ok)
        before = (self.state.state_hash(), dict(self.state.accounts()))
        nonce_before = self.state.account(t.sender).nonce
        height = self.state.height + 1
        try:
            self.state.apply(t, proposer=ACCT[proposer], height=height)
        except TxRejected as exc:
            assert type(exc) is expected, f"{type(exc).__name__} ({exc}), model expected {expected}"
            assert (self.state.state_hash(), dict(self.state.accounts())) == before
            return
        assert expected is None, f"applied, model expected {expected.__name__}"
        assert t.chain_id == CHAIN and not forge
        assert self.state.account(t.sender).nonce == nonce_before + 1
        self.model = trial
        self.applied.append(t)
        if isinstance(t.body, Settle):
            self.settled.extend(t.body.receipts)
        self.twin.apply(t, proposer=ACCT[proposer], height=height, verify=False)

    @rule(sender=names, to=names, amount=small, fault=faults, p=names)
    def transfer(self, sender: str, to: str, amount: int, fault: str, p: str) -> None:
        self._submit(sender, Transfer(ACCT[to], amount), fault, p)

    @rule(sender=names, amount=small, fault=faults, p=names)
    def stake(self, sender: str, amount: int, fault: str, p: str) -> None:
        self._submit(sender, Stake(amount), fault, p)

    @rule(sender=names, share=st.integers(min_value=1, max_value=10), fault=faults, p=names)
    def stake_share(self, sender: str, share: int, fault: str, p: str) -> None:
        """Stake a share of the balance: mostly valid, unlike ``stake``'s random amounts."""
        amount = max(1, (self.state.account(ACCT[sender]).balance - 3) * share // 10)
        self._submit(sender, Stake(amount), fault, p)

    @precondition(lambda self: any(self.state.account(a).stake for a in ACCT.values()))
    @rule(data=st.data(), share=st.integers(min_value=0, max_value=12), fault=faults, p=names)
    def unstake(self, data: st.DataObject, share: int, fault: str, p: str) -> None:
        """Unstake a share of a staker's stake: 0 is a zero amount, over 10 more than staked."""
        sender = data.draw(st.sampled_from([n for n in NAMES if self.state.account(ACCT[n]).stake]), label="sender")
        staked = self.state.account(ACCT[sender]).stake
        amount = staked * share // 10 + (share > 10)
        self._submit(sender, Unstake(amount), fault, p)

    @rule(target=receipts, payer=names, payee=names, amount=small, fault=faults)
    def make_receipt(self, payer: str, payee: str, amount: int, fault: str) -> Receipt:
        chain, forge = ("prsm-other" if fault == "chain" else CHAIN), fault == "forge"
        self.receipt_counter += 1
        rid = self.receipt_counter.to_bytes(32, "big")
        r = sign_receipt(
            MALLORY if forge else KEYS[payer], receipt_id=rid, payee=ACCT[payee], amount=amount, chain_id=chain
        )
        r = dataclasses.replace(r, payer=ACCT[payer])
        self.receipt_sig_ok[r] = not forge
        return r

    @precondition(lambda self: self.receipt_counter > 0)
    @rule(sender=names, rs=st.lists(receipts, min_size=1, max_size=3), fault=faults, p=names)
    def settle(self, sender: str, rs: list[Receipt], fault: str, p: str) -> None:
        self._submit(sender, Settle(tuple(rs)), fault, p)

    @precondition(lambda self: self.receipt_counter > 0)
    @rule(r=receipts, more=st.lists(receipts, max_size=2), p=names)
    def settle_as_payee(self, r: Receipt, more: list[Receipt], p: str) -> None:
        mine = (r, *(x for x in more if x.payee == r.payee))
        payee = next(n for n, a in ACCT.items() if a == r.payee)
        self._submit(payee, Settle(mine), "none", p)

    @precondition(lambda self: bool(self.applied))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        t = data.draw(st.sampled_from(self.applied))
        before = self.state.state_hash()
        try:
            self.state.apply(t, proposer=ACCT["carol"], height=self.state.height + 1)
        except BadNonce:
            assert self.state.state_hash() == before
        else:
            raise AssertionError("a replayed tx was applied")

    @precondition(lambda self: bool(self.settled))
    @rule(data=st.data(), p=names)
    def settle_again(self, data: st.DataObject, p: str) -> None:
        r = data.draw(st.sampled_from(self.settled))
        payee = next(n for n, a in ACCT.items() if a == r.payee)
        self._submit(payee, Settle((r,)), "none", p)

    @rule(p=names, then=st.sampled_from(["checkpoint", "keep", "checkpoint", "abort", "keep", "end_and_abort"]))
    def close_block(self, p: str, then: str) -> None:
        """End the block, then: checkpoint it, keep it revertible (a later abort undoes several
        blocks), or revert to the checkpoint. ``abort`` reverts without ending the block."""
        if then != "abort":
            height = self.state.height + 1
            self.state.end_block(height, proposer=ACCT[p])
            self.twin.end_block(height, proposer=ACCT[p])
            self.model.end_block(ACCT[p])
        if then == "checkpoint":
            for s in (self.state, self.twin):
                s.checkpoint()
            self.saved_model = copy.deepcopy(self.model)
            self.saved_applied = len(self.applied)
            self.saved_settled = len(self.settled)
        elif then in ("abort", "end_and_abort"):
            for s in (self.state, self.twin):
                s.revert_to_checkpoint()
            self.model = copy.deepcopy(self.saved_model)
            del self.applied[self.saved_applied :]
            del self.settled[self.saved_settled :]

    @invariant()
    def matches_model(self) -> None:
        assert dict(self.state.accounts()) == self.model.frozen()
        assert self.state.stakes() == {k: a.stake for k, a in self.model.frozen().items() if a.stake}
        assert set(self.state.settled_receipts()) == self.model.settled
        assert self.state.height == self.model.height

    @invariant()
    def supply_is_conserved(self) -> None:
        self.state.check_supply()
        assert self.state.total_supply == sum(GENESIS.values()) + self.model.minted
        for _, a in self.state.accounts():
            assert min(a.balance, a.stake, a.nonce, *(x for x, _ in a.unbonding)) >= 0

    @invariant()
    def state_hash_is_consistent(self) -> None:
        assert self.state.state_hash() == self.state.recompute_state_hash()
        assert self.twin.state_hash() == self.state.state_hash()


class QuickReleaseMachine(LedgerMachine):
    """Unbonding released at the end of the very block, no minimum fee, no block reward."""

    params = LedgerParams(unbonding_blocks=0, min_fee=0, block_reward=0)


SETTINGS = settings(
    max_examples=75, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
LedgerMachine.TestCase.settings = SETTINGS
QuickReleaseMachine.TestCase.settings = SETTINGS
test_ledger_state_machine = LedgerMachine.TestCase
test_ledger_state_machine_quick_release = QuickReleaseMachine.TestCase

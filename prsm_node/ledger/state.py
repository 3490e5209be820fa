"""LedgerState: the pure, deterministic FTNS state machine (no I/O, no clock).

``apply(tx, proposer=, height=)`` either applies a whole tx or raises a TxRejected subclass
and changes nothing: it runs the tx against a private working copy of the accounts it
touches, checking everything on the way, and commits those accounts only at the end. Fees go
to the block's proposer (never burned), so a tx conserves total supply; ``end_block`` mints
``block_reward`` to the proposer, so ``total == genesis supply + minted`` always.

The journal (``changes`` / ``checkpoint`` / ``revert_to_checkpoint``) is for the layers
above: storage writes ``changes()`` as one batch per block, and a block that turns out to
hold an invalid tx is undone with ``revert_to_checkpoint()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..breaker.votes import verify_vote
from ..genesis import Genesis
from . import statehash
from .codec import is_validated, validate_tx
from .exceptions import (
    AmountOutOfRange,
    BadNonce,
    BadSignature,
    BlockContextError,
    FeeTooLow,
    InsufficientFunds,
    InsufficientStake,
    LedgerError,
    MalformedTx,
    ReceiptAlreadySettled,
    ReceiptPayeeMismatch,
    StaleVote,
    SupplyViolation,
    WrongChain,
)
from .params import LedgerParams, genesis_chain_id, genesis_holdings
from .signing import verify_receipt_signature, verify_tx_signature
from .types import (
    ACCOUNT_SIZE,
    MAX_AMOUNT,
    MAX_NONCE,
    Account,
    BreakerVote,
    Receipt,
    Settle,
    Stake,
    Transfer,
    Tx,
    Unstake,
    VoteRecord,
)

EMPTY = Account()


def _who(tx: Tx) -> str:
    return f"tx from {tx.sender.hex()} nonce {tx.nonce}"


def receipt_key(payer: bytes, receipt_id: bytes) -> bytes:
    """The settled-set key of a receipt: ``payer || receipt_id``. Receipt ids live in their
    payer's namespace, so nobody can settle a receipt id first to make another payer's
    receipt with the same id unpayable."""
    return payer + receipt_id


def vote_key(model: bytes, voter: bytes) -> bytes:
    """The key of a recorded breaker vote: ``model || voter`` (64 bytes)."""
    return model + voter


@dataclass(frozen=True)
class StateChanges:
    """What changed since the last checkpoint: a storage batch."""

    height: int
    minted: int
    accounts: dict[bytes, Account]  # the current value of every touched account; empty = delete
    settled: frozenset[bytes]  # receipt keys settled since the checkpoint
    accumulator: int
    votes: dict[bytes, VoteRecord] = field(default_factory=dict)  # breaker votes recorded since


@dataclass(frozen=True)
class BlockEnd:
    """What end_block did: the height closed, the amount minted, the stake released."""

    height: int
    minted: int
    released: tuple[tuple[bytes, int], ...]


class _Work:
    """A copy-on-write view of the accounts a tx touches."""

    def __init__(self, state: LedgerState) -> None:
        self._state = state
        self.touched: dict[bytes, Account] = {}

    def get(self, key: bytes) -> Account:
        found = self.touched.get(key)
        return found if found is not None else self._state.account(key)

    def put(self, key: bytes, value: Account) -> None:
        self.touched[key] = value

    def debit(self, key: bytes, amount: int, why: str) -> None:
        a = self.get(key)
        if a.balance < amount:
            raise InsufficientFunds(f"account {key.hex()}: balance {a.balance} does not cover {why} {amount}")
        self.put(key, Account(a.balance - amount, a.nonce, a.stake, a.unbonding))

    def credit(self, key: bytes, amount: int) -> None:
        a = self.get(key)
        self.put(key, Account(a.balance + amount, a.nonce, a.stake, a.unbonding))


class LedgerState:
    """The accounts, the settled receipts, the height and the incremental state hash."""

    def __init__(
        self,
        chain_id: str,
        params: LedgerParams | None = None,
        *,
        accounts: dict[bytes, Account] | None = None,
        settled: Iterable[bytes] = (),
        height: int = 0,
        genesis_supply: int | None = None,
        minted: int = 0,
        votes: dict[bytes, VoteRecord] | None = None,
    ) -> None:
        """Build a state from its parts (genesis, or a snapshot loaded from storage).

        ``genesis_supply`` defaults to the sum held by ``accounts`` less ``minted``.
        """
        self.chain_id = genesis_chain_id(chain_id)
        self.params = params or LedgerParams()
        self.params.validate()
        self._accounts: dict[bytes, Account] = {}
        for key, a in (accounts or {}).items():
            if type(key) is not bytes or len(key) != ACCOUNT_SIZE:
                raise LedgerError(f"account key {key!r} is not {ACCOUNT_SIZE} bytes")
            releases = [release for _, release in a.unbonding]
            if releases != sorted(set(releases)) or any(r <= height for r in releases):
                raise LedgerError(f"account {key.hex()}: unbonding must be after height {height}, ascending, unique")
            if not a.is_empty:
                self._accounts[key] = a
        self._settled: set[bytes] = set(settled)
        for key in self._settled:
            if type(key) is not bytes or len(key) != 2 * ACCOUNT_SIZE:
                raise LedgerError(f"settled receipt key {key!r} is not payer || receipt_id (64 bytes)")
        self._votes: dict[bytes, VoteRecord] = {}
        for key, record in (votes or {}).items():
            if key != vote_key(record.vote.model, record.vote.voter) or not 0 < record.height <= height:
                raise LedgerError(f"breaker vote record {key.hex()} is under the wrong key or height")
            self._votes[key] = record
        self._height = height
        self._minted = minted
        held = sum(a.total for a in self._accounts.values())
        self._genesis_supply = held - minted if genesis_supply is None else genesis_supply
        if held > MAX_AMOUNT:
            raise SupplyViolation(f"accounts hold {held}, over 2**128-1")
        self._held = held
        self.check_supply()  # before hashing: a negative amount has no encoding
        self._acc = statehash.from_scratch(self._accounts, self._settled, self._votes)
        # Accounts changed since the accumulator was last brought up to date, with their value
        # then: the accumulator is updated once per account per block, not once per tx.
        self._dirty: dict[bytes, Account] = {}
        self._due: dict[int, set[bytes]] = {}  # release height -> accounts with unbonding due then
        for key, a in self._accounts.items():
            self._index(key, a, add=True)
        # Every account with stake: the breaker's stake table is read from it after each block,
        # in time proportional to the stakers rather than to every account.
        self._stakes: dict[bytes, int] = {key: a.stake for key, a in self._accounts.items() if a.stake}
        self._journal_accounts: dict[bytes, Account] = {}
        self._journal_settled: set[bytes] = set()
        self._journal_votes: dict[bytes, VoteRecord | None] = {}  # key -> record before the checkpoint
        self._checkpoint = (self._height, self._minted)

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> LedgerState:
        balances, stakes = genesis_holdings(genesis)
        params = LedgerParams.from_genesis_params(genesis.params)
        accounts = {
            k: Account(balance=balances.get(k, 0), stake=stakes.get(k, 0)) for k in balances.keys() | stakes.keys()
        }
        return cls(genesis.chain_id, params, accounts=accounts)

    # ------------------------------------------------------------ reads

    @property
    def height(self) -> int:
        """The last block closed by end_block (0 at genesis)."""
        return self._height

    @property
    def minted(self) -> int:
        return self._minted

    @property
    def genesis_supply(self) -> int:
        return self._genesis_supply

    @property
    def total_supply(self) -> int:
        return self._genesis_supply + self._minted

    @property
    def accumulator(self) -> int:
        """The raw 16384-bit set-hash accumulator (storage may persist it)."""
        self._flush()
        return self._acc

    def account(self, key: bytes) -> Account:
        """The account's state; an unknown account is the empty Account()."""
        return self._accounts.get(key, EMPTY)

    def accounts(self) -> Iterator[tuple[bytes, Account]]:
        """Every non-empty account, in ascending key order."""
        for key in sorted(self._accounts):
            yield key, self._accounts[key]

    def stakes(self) -> dict[bytes, int]:
        """Every account with stake, and its stake (a copy; kept up to date per change, so this
        costs the number of stakers, not of accounts)."""
        return dict(self._stakes)

    def settled_receipts(self) -> Iterator[bytes]:
        """Every settled receipt key (``payer || receipt_id``), in ascending order."""
        yield from sorted(self._settled)

    def is_settled(self, payer: bytes, receipt_id: bytes) -> bool:
        return receipt_key(payer, receipt_id) in self._settled

    def vote_record(self, model: bytes, voter: bytes) -> VoteRecord | None:
        """The latest breaker vote of ``voter`` on ``model`` recorded by a block, if any."""
        return self._votes.get(vote_key(model, voter))

    def vote_records(self, model: bytes | None = None) -> Iterator[VoteRecord]:
        """Every recorded breaker vote (of ``model``, or all), in ``model || voter`` order."""
        keys = sorted(k for k in self._votes if model is None or k[:32] == model)
        for key in keys:
            yield self._votes[key]

    @property
    def unbonding_pending(self) -> bool:
        """True while some stake is unbonding: blocks must go on for it to be released."""
        return bool(self._due)

    def state_hash(self) -> bytes:
        """32 bytes binding chain id, height and every account and settled receipt.
        O(accounts changed since the last call)."""
        self._flush()
        return statehash.report(self.chain_id, self._height, self._acc)

    def recompute_state_hash(self) -> bytes:
        """The same hash computed from scratch over the whole state. O(accounts + receipts)."""
        acc = statehash.from_scratch(self._accounts, self._settled, self._votes)
        return statehash.report(self.chain_id, self._height, acc)

    def check_block_supply(self) -> None:
        """The per-block supply check, O(accounts changed since the checkpoint): the running
        total held (kept up to date by every change) equals genesis + minted, and no changed
        account is negative anywhere. ``check_supply`` re-sums everything."""
        if self._held != self.total_supply:
            raise SupplyViolation(
                f"accounts hold {self._held}, expected genesis supply {self._genesis_supply} + minted {self._minted}"
            )
        for key in self._journal_accounts:
            a = self.account(key)
            if min(a.balance, a.stake, *(x for x, _ in a.unbonding)) < 0:
                raise SupplyViolation(f"negative balance, stake or unbonding in account {key.hex()}")

    def check_supply(self) -> None:
        """Raise SupplyViolation unless sum(balance + stake + unbonding) == genesis + minted
        (and equals the running total that check_block_supply relies on). O(accounts)."""
        held = sum(a.total for a in self._accounts.values())
        if held != self._held:
            raise SupplyViolation(f"accounts hold {held}, the running total says {self._held}")
        if held != self.total_supply:
            raise SupplyViolation(
                f"accounts hold {held}, expected genesis supply {self._genesis_supply} + minted {self._minted}"
                f" = {self.total_supply}"
            )
        negative = [
            k.hex() for k, a in self._accounts.items() if min(a.balance, a.stake, *(x for x, _ in a.unbonding)) < 0
        ]
        if negative:
            raise SupplyViolation(f"negative balance, stake or unbonding in accounts {', '.join(negative)}")

    # ------------------------------------------------------------ transitions

    def check(self, tx: Tx, *, proposer: bytes, height: int, verify: bool = True) -> None:
        """Raise what apply() would raise, without changing anything (a mempool's test)."""
        self._execute(tx, proposer, height, verify)

    def apply(self, tx: Tx, *, proposer: bytes, height: int, verify: bool = True) -> None:
        """Apply ``tx`` in block ``height`` (== self.height + 1), its fee going to ``proposer``.

        Raises a TxRejected subclass and leaves the state untouched if any rule fails.
        ``verify=False`` skips the tx and receipt signature checks (a caller that has
        verified them already, e.g. in the mempool); every other rule still applies.
        """
        touched, receipts, record = self._execute(tx, proposer, height, verify)
        for key, value in touched.items():
            self._put(key, value)
        for key in receipts:
            self._settle_key(key)
        if record is not None:
            self._record_vote(record)

    def end_block(self, height: int, *, proposer: bytes) -> BlockEnd:
        """Close block ``height``: release unbonding due at it, mint the block reward to the
        proposer (capped so total supply stays <= 2**128-1), and advance the height."""
        self._check_context(proposer, height)
        released = []
        for key in sorted(self._due.get(height, ())):
            a = self.account(key)
            due = sum(amount for amount, release in a.unbonding if release <= height)
            keep = tuple(e for e in a.unbonding if e[1] > height)
            self._put(key, dataclasses.replace(a, balance=a.balance + due, unbonding=keep))
            released.append((key, due))
        minted = min(self.params.block_reward, MAX_AMOUNT - self.total_supply)
        if minted:
            p = self.account(proposer)
            self._put(proposer, dataclasses.replace(p, balance=p.balance + minted))
            self._minted += minted
        self._height = height
        return BlockEnd(height, minted, tuple(released))

    # ------------------------------------------------------------ journal

    def changes(self) -> StateChanges:
        """Everything changed since the last checkpoint (or construction)."""
        self._flush()
        return StateChanges(
            height=self._height,
            minted=self._minted,
            accounts={k: self.account(k) for k in self._journal_accounts},
            settled=frozenset(self._journal_settled),
            accumulator=self._acc,
            votes={k: self._votes[k] for k in self._journal_votes if k in self._votes},
        )

    def checkpoint(self) -> None:
        """Make everything so far final: forget the undo journal."""
        self._journal_accounts.clear()
        self._journal_settled.clear()
        self._journal_votes.clear()
        self._checkpoint = (self._height, self._minted)

    def revert_to_checkpoint(self) -> None:
        """Undo every apply and end_block since the last checkpoint."""
        for key, original in self._journal_accounts.items():
            self._put(key, original, journal=False)
        for key in self._journal_settled:
            self._settled.discard(key)
            self._acc = (self._acc - statehash.receipt_term(key)) & statehash.ACC_MASK
        for key, before in self._journal_votes.items():
            self._set_vote(key, before)
        self._height, self._minted = self._checkpoint
        self.checkpoint()

    # ------------------------------------------------------------ internals

    def _check_context(self, proposer: bytes, height: int) -> None:
        if type(proposer) is not bytes or len(proposer) != ACCOUNT_SIZE:
            raise BlockContextError(f"proposer must be a {ACCOUNT_SIZE}-byte account, got {proposer!r}")
        if height != self._height + 1:
            raise BlockContextError(f"height {height} is not the next block (the ledger is at {self._height})")

    def _execute(
        self, tx: Tx, proposer: bytes, height: int, verify: bool
    ) -> tuple[dict[bytes, Account], list[bytes], VoteRecord | None]:
        """Run ``tx`` on a working copy; return (touched accounts, new receipt keys, the
        breaker vote to record).

        Cheap checks come first and signatures last, so junk costs no Ed25519 verify.
        """
        self._check_context(proposer, height)
        if not is_validated(tx):
            validate_tx(tx)
        sender, fee, body = tx.sender, tx.fee, tx.body
        if tx.chain_id != self.chain_id:
            raise WrongChain(f"{_who(tx)}: chain id {tx.chain_id!r}, this ledger is {self.chain_id!r}")
        start = self.account(sender)
        if tx.nonce != start.nonce:
            raise BadNonce(sender, start.nonce, tx.nonce)
        if tx.nonce == MAX_NONCE:  # the next nonce would not fit a uint64
            raise MalformedTx(f"{_who(tx)}: account nonce space exhausted")
        if fee < self.params.min_fee:
            raise FeeTooLow(f"{_who(tx)}: fee {fee} is below the minimum fee {self.params.min_fee}")
        if type(body) is Transfer:
            return self._transfer(tx, body, start, proposer, verify), [], None
        work = _Work(self)
        receipts: list[Receipt] = []
        record: VoteRecord | None = None
        if isinstance(body, Transfer | Stake | Unstake):
            if body.amount <= 0:
                raise AmountOutOfRange(f"{_who(tx)}: {type(body).__name__.lower()} amount must be positive, got 0")
        if isinstance(body, Transfer | Stake):
            if start.balance < body.amount + fee:
                raise InsufficientFunds(
                    f"{_who(tx)}: balance {start.balance} does not cover amount {body.amount} + fee {fee}"
                )
            work.debit(sender, body.amount, "amount")
            if isinstance(body, Transfer):
                work.credit(body.to, body.amount)
            else:
                s = work.get(sender)
                work.put(sender, Account(s.balance, s.nonce, s.stake + body.amount, s.unbonding))
        elif isinstance(body, Unstake):
            if start.stake < body.amount:
                raise InsufficientStake(f"{_who(tx)}: stake {start.stake} does not cover unstake {body.amount}")
            release = height + self.params.unbonding_blocks
            entries = list(start.unbonding)
            if entries and entries[-1][1] == release:
                entries[-1] = (entries[-1][0] + body.amount, release)
            else:
                entries.append((body.amount, release))
            work.put(sender, dataclasses.replace(start, stake=start.stake - body.amount, unbonding=tuple(entries)))
        elif isinstance(body, BreakerVote):
            self.check_vote_body(body, _who(tx))
            record = VoteRecord(body.vote, height)
        else:
            receipts = self._settle(work, tx, body, _who(tx))
        # The fee is charged after the body, so a payee may pay a Settle's fee from what it settles.
        work.debit(sender, fee, "fee")
        work.credit(proposer, fee)
        s = work.get(sender)
        work.put(sender, Account(s.balance, s.nonce + 1, s.stake, s.unbonding))
        if verify:
            if not verify_tx_signature(tx):
                raise BadSignature(f"{_who(tx)}: signature does not verify")
            for r in receipts:
                if not verify_receipt_signature(r):
                    rid, payer = r.receipt_id.hex(), r.payer.hex()
                    raise BadSignature(f"{_who(tx)}: receipt {rid} is not signed by its payer {payer}")
            if record is not None and not verify_vote(record.vote):
                voter = record.vote.voter.hex()
                raise BadSignature(f"{_who(tx)}: the breaker vote is not signed by its voter {voter}")
        return work.touched, [receipt_key(r.payer, r.receipt_id) for r in receipts], record

    def check_vote_body(self, body: BreakerVote, who: str) -> None:
        """The rules of a BreakerVote against this state (not the signatures): the vote is for
        this chain, its voter has stake, and its epoch is above the recorded one."""
        vote = body.vote
        if vote.chain_id != self.chain_id:
            raise WrongChain(f"{who}: breaker vote for chain {vote.chain_id!r}, this ledger is {self.chain_id!r}")
        if self.account(vote.voter).stake <= 0:
            raise InsufficientStake(f"{who}: breaker voter {vote.voter.hex()} has no stake")
        last = self._votes.get(vote_key(vote.model, vote.voter))
        if last is not None and vote.epoch <= last.vote.epoch:
            raise StaleVote(
                f"{who}: breaker vote of {vote.voter.hex()} on model {vote.model.hex()} has epoch {vote.epoch},"
                f" the ledger recorded epoch {last.vote.epoch}"
            )

    def _transfer(self, tx: Tx, body: Transfer, start: Account, proposer: bytes, verify: bool) -> dict[bytes, Account]:
        """The hot path of ``_execute`` for a transfer: the same rules and result (sender
        debited amount + fee with its nonce advanced, recipient credited, proposer paid the fee;
        any of them may be the same account), without the general bookkeeping."""
        amount, fee, sender = body.amount, tx.fee, tx.sender
        if amount <= 0:
            raise AmountOutOfRange(f"{_who(tx)}: transfer amount must be positive, got 0")
        if start.balance < amount + fee:
            raise InsufficientFunds(f"{_who(tx)}: balance {start.balance} does not cover amount {amount} + fee {fee}")
        touched = {sender: Account(start.balance - amount - fee, start.nonce + 1, start.stake, start.unbonding)}
        r = touched.get(body.to) or self.account(body.to)
        touched[body.to] = Account(r.balance + amount, r.nonce, r.stake, r.unbonding)
        if fee:
            p = touched.get(proposer) or self.account(proposer)
            touched[proposer] = Account(p.balance + fee, p.nonce, p.stake, p.unbonding)
        if verify and not verify_tx_signature(tx):
            raise BadSignature(f"{_who(tx)}: signature does not verify")
        return touched

    def _settle(self, work: _Work, tx: Tx, body: Settle, who: str) -> list[Receipt]:
        seen: set[bytes] = set()
        for r in body.receipts:
            rid = r.receipt_id.hex()
            if r.amount <= 0:
                raise AmountOutOfRange(f"{who}: receipt {rid} amount must be positive, got 0")
            if r.chain_id != self.chain_id:
                raise WrongChain(f"{who}: receipt {rid} is for chain {r.chain_id!r}, this ledger is {self.chain_id!r}")
            if r.payee != tx.sender:
                raise ReceiptPayeeMismatch(f"{who}: receipt {rid} pays {r.payee.hex()}, not the sender")
            key = receipt_key(r.payer, r.receipt_id)
            if key in seen:
                raise ReceiptAlreadySettled(f"{who}: receipt {rid} of payer {r.payer.hex()} appears twice")
            if key in self._settled:
                raise ReceiptAlreadySettled(f"{who}: receipt {rid} of payer {r.payer.hex()} is already settled")
            seen.add(key)
            work.debit(r.payer, r.amount, f"receipt {rid}")
            work.credit(r.payee, r.amount)
        return list(body.receipts)

    def _put(self, key: bytes, new: Account, *, journal: bool = True) -> None:
        old = self._accounts.get(key, EMPTY)
        if old == new:
            return
        if journal and key not in self._journal_accounts:
            self._journal_accounts[key] = old
        if key not in self._dirty:
            self._dirty[key] = old
        self._held += new.total - old.total
        if old.stake != new.stake:
            if new.stake:
                self._stakes[key] = new.stake
            else:
                del self._stakes[key]
        if old.unbonding or new.unbonding:
            self._index(key, old, add=False)
            self._index(key, new, add=True)
        if new.is_empty:
            self._accounts.pop(key, None)
        else:
            self._accounts[key] = new

    def _flush(self) -> None:
        """Bring the accumulator up to date: each changed account's old term out, new term in."""
        acc = self._acc
        for key, before in self._dirty.items():
            after = self._accounts.get(key, EMPTY)
            if after != before:
                acc += statehash.account_term(key, after) - statehash.account_term(key, before)
        self._acc = acc & statehash.ACC_MASK
        self._dirty.clear()

    def _record_vote(self, record: VoteRecord) -> None:
        key = vote_key(record.vote.model, record.vote.voter)
        if key not in self._journal_votes:
            self._journal_votes[key] = self._votes.get(key)
        self._set_vote(key, record)

    def _set_vote(self, key: bytes, record: VoteRecord | None) -> None:
        old = self._votes.get(key)
        acc = self._acc
        if old is not None:
            acc -= statehash.vote_term(key, old)
            del self._votes[key]
        if record is not None:
            acc += statehash.vote_term(key, record)
            self._votes[key] = record
        self._acc = acc & statehash.ACC_MASK

    def _settle_key(self, key: bytes) -> None:
        self._settled.add(key)
        self._journal_settled.add(key)
        self._acc = (self._acc + statehash.receipt_term(key)) & statehash.ACC_MASK

    def _index(self, key: bytes, a: Account, *, add: bool) -> None:
        for _, release in a.unbonding:
            if add:
                self._due.setdefault(release, set()).add(key)
            else:
                due = self._due.get(release)
                if due is not None:
                    due.discard(key)
                    if not due:
                        del self._due[release]

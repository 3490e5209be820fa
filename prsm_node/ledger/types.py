"""Ledger value types: accounts, transaction bodies, receipts, the signed envelope.

All amounts are Python ints in the smallest unit (1 FTNS = 10**18 units), from 0 to
``MAX_AMOUNT`` = 2**128-1. Every type is a frozen dataclass: the state replaces an
``Account`` rather than mutating it, which keeps "check everything, then commit" cheap.
Field shapes (lengths, ranges) are checked by ``codec.validate_tx``, not by constructors, so
that tests and the mempool can build bad objects and see the specific error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

from ..breaker.votes import Vote
from .exceptions import AmountOutOfRange, InvalidAmountString

DECIMALS = 18
UNIT = 10**DECIMALS
MAX_AMOUNT = (1 << 128) - 1
MAX_NONCE = (1 << 64) - 1
ACCOUNT_SIZE = 32  # raw Ed25519 public key
RECEIPT_ID_SIZE = 32
SIGNATURE_SIZE = 64

_AMOUNT_RE = re.compile(r"(0|[1-9][0-9]*)(?:\.([0-9]{1,18}))?")


@dataclass(frozen=True)
class Account:
    """One account's state. ``unbonding`` holds ``(amount, release_height)`` pairs in
    ascending release height, at most one per height."""

    balance: int = 0
    nonce: int = 0
    stake: int = 0
    unbonding: tuple[tuple[int, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        """An empty account is the same as an absent one: not stored, not hashed."""
        return self.balance == 0 and self.nonce == 0 and self.stake == 0 and not self.unbonding

    @property
    def total(self) -> int:
        """What this account holds in every form: balance + stake + unbonding."""
        if not self.unbonding:
            return self.balance + self.stake
        return self.balance + self.stake + sum(amount for amount, _ in self.unbonding)


@dataclass(frozen=True)
class Receipt:
    """A usage receipt: ``payer`` promises ``amount`` to ``payee``. Signed by the payer; the
    payee settles it on chain with a Settle tx. ``(payer, receipt_id)`` settles at most once."""

    receipt_id: bytes
    payer: bytes
    payee: bytes
    amount: int
    chain_id: str
    signature: bytes = b""


@dataclass(frozen=True)
class Transfer:
    to: bytes
    amount: int


@dataclass(frozen=True)
class Stake:
    amount: int


@dataclass(frozen=True)
class Unstake:
    """Moves ``amount`` from stake to unbonding; it returns to the balance
    ``unbonding_blocks`` blocks later."""

    amount: int


@dataclass(frozen=True)
class Settle:
    """Pays ``payer -> payee`` for each receipt; submitted (and signed) by the payee."""

    receipts: tuple[Receipt, ...]


@dataclass(frozen=True)
class BreakerVote:
    """Records a signed circuit-breaker vote (protocols/breaker.md) in the ledger: the latest
    vote of each (model, voter) becomes part of the state, so the history of halts is
    consensus-ordered. Any account may submit it (validators do, for the votes they see);
    it moves no value beyond the fee. The vote carries its own voter signature."""

    vote: Vote


@dataclass(frozen=True)
class VoteRecord:
    """The ledger's record of the latest vote of one voter on one model, and the height of
    the block that recorded it."""

    vote: Vote
    height: int


Body: TypeAlias = Transfer | Stake | Unstake | Settle | BreakerVote


@dataclass(frozen=True)
class Tx:
    """The signed envelope. ``signature`` is Ed25519 by ``sender`` over ``signing_payload``
    (chain id and nonce included: no replay across networks nor within one)."""

    chain_id: str
    sender: bytes
    nonce: int
    fee: int
    body: Body
    signature: bytes = b""


def format_amount(amount: int) -> str:
    """Display an amount in FTNS: ``1500000000000000000 -> "1.5"``, ``0 -> "0"``. Exact."""
    if type(amount) is not int or not 0 <= amount <= MAX_AMOUNT:
        raise AmountOutOfRange(f"amount {amount!r} is not an integer in [0, 2**128-1]")
    whole, frac = divmod(amount, UNIT)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:0{DECIMALS}d}".rstrip("0")


def parse_amount(text: str) -> int:
    """Parse an exact FTNS decimal ("1.5", "0.000000000000000001", "42") to smallest units.

    Rejects signs, exponents, spaces, underscores, leading zeros, a bare or trailing dot and
    more than 18 decimals (InvalidAmountString); values over 2**128-1 (AmountOutOfRange).
    """
    if not isinstance(text, str):
        raise InvalidAmountString(f"amount must be a string, not {type(text).__name__}")
    m = _AMOUNT_RE.fullmatch(text)
    if m is None:
        raise InvalidAmountString(f"amount {text!r} is not a plain decimal with at most {DECIMALS} decimals (like 1.5)")
    whole: str = m.group(1)
    frac: str = m.group(2) or ""
    if len(whole) > 40:  # 2**128 has 39 digits; also keeps int() far from its digit limit
        raise AmountOutOfRange(f"amount {text[:48]}... exceeds the maximum {format_amount(MAX_AMOUNT)}")
    amount: int = int(whole) * UNIT + int(frac.ljust(DECIMALS, "0") or "0")
    if amount > MAX_AMOUNT:
        raise AmountOutOfRange(f"amount {text} exceeds the maximum {format_amount(MAX_AMOUNT)}")
    return amount

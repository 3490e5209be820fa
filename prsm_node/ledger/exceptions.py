"""Errors of the ledger core. Every one derives from LedgerError.

``TxRejected`` and its subclasses mean "this transaction was not applied and the state is
exactly as before"; a mempool drops (or, for a future nonce, parks) the tx and keeps going.
``LedgerDecodeError`` means the bytes are not a transaction at all: penalise the peer.
The remaining errors are the caller's bug (``BlockContextError``), a bad genesis
(``GenesisError``) or a broken invariant (``SupplyViolation``).
"""

from __future__ import annotations

from ..exceptions import PrsmError


class LedgerError(PrsmError):
    """Root of every error raised on purpose by prsm_node.ledger."""

    code = "ledger_error"


# ------------------------------------------------------------ bytes


class LedgerDecodeError(LedgerError):
    """Raised when bytes are not a valid canonical encoding: malformed msgpack, a wrong field
    type or length, trailing bytes, a non-minimal form, or over a size limit."""

    code = "malformed"


class UnknownKind(LedgerDecodeError):
    """Raised when a transaction body carries a kind tag this version does not know."""

    code = "unknown_kind"


class InvalidAmountString(LedgerError):
    """Raised when a human-written amount ("1.5") is not an exact, non-negative decimal
    with at most 18 decimals (no sign, exponent, spaces or underscores)."""

    code = "invalid_amount"


class GenesisError(LedgerError):
    """Raised when genesis balances or ledger params cannot build a ledger (bad account hex,
    duplicate account, malformed amount, total supply over 2**128-1, bad param type)."""

    code = "genesis_error"


class BlockContextError(LedgerError):
    """Raised when apply()/end_block() is called for a height that is not the next block, or
    with a proposer that is not a 32-byte account: the caller's bug, not the transaction's."""

    code = "internal"


class SupplyViolation(LedgerError):
    """Raised by check_supply() when the sum of all balances, stakes and unbonding amounts
    differs from genesis supply + minted, or the running total disagrees with that sum."""

    code = "internal"


# ------------------------------------------------------------ rejected transactions


class TxRejected(LedgerError):
    """Raised when a transaction cannot be applied; the state is left unchanged."""

    code = "rejected"


class MalformedTx(TxRejected):
    """Raised when a transaction object has a field of the wrong type or length (an account
    that is not 32 bytes, a nonce that is not a uint64, a Settle with no receipts, ...)."""

    code = "malformed"


class AmountOutOfRange(TxRejected):
    """Raised when an amount or fee is negative or over 2**128-1, or an amount that must be
    positive (transfer, stake, unstake, receipt) is zero."""

    code = "amount_out_of_range"


class WrongChain(TxRejected):
    """Raised when a transaction or one of its receipts names another chain id."""

    code = "wrong_chain"


class BadSignature(TxRejected):
    """Raised when the sender's signature on a transaction, or a payer's signature on a
    receipt, does not verify."""

    code = "bad_signature"


class BadNonce(TxRejected):
    """Raised when a transaction's nonce is not the sender's next nonce: ``got < expected`` is
    a replay or a stale tx, ``got > expected`` a tx from the future (a mempool may park it)."""

    code = "bad_nonce"

    def __init__(self, account: bytes, expected: int, got: int) -> None:
        super().__init__(f"account {account.hex()}: nonce {got}, expected {expected}")
        self.account = account
        self.expected = expected
        self.got = got


class FeeTooLow(TxRejected):
    """Raised when a transaction's fee is below the ``min_fee`` ledger parameter."""

    code = "fee_too_low"


class InsufficientFunds(TxRejected):
    """Raised when an account's balance does not cover what the tx debits from it (amount +
    fee for the sender, the receipt amounts for a payer)."""

    code = "insufficient_funds"


class InsufficientStake(TxRejected):
    """Raised when an Unstake asks for more than the sender has staked, or a BreakerVote's
    voter has no stake."""

    code = "insufficient_stake"


class StaleVote(TxRejected):
    """Raised when a BreakerVote's epoch is not above the epoch the ledger recorded for the
    same (model, voter): a replay, or a duplicate submitted by another validator."""

    code = "stale_vote"


class ReceiptAlreadySettled(TxRejected):
    """Raised when a receipt (payer, receipt_id) was settled before, or appears twice in one
    Settle transaction."""

    code = "receipt_already_settled"


class ReceiptPayeeMismatch(TxRejected):
    """Raised when a Settle transaction carries a receipt whose payee is not its sender."""

    code = "receipt_payee_mismatch"


# ------------------------------------------------------------ mempool


class DuplicateTx(TxRejected):
    """Raised when the mempool already holds this tx, or another pending tx with the same
    sender and nonce (a pending tx is never replaced)."""

    code = "duplicate"


class MempoolFull(TxRejected):
    """Raised when the mempool is at its size limit and the tx's fee does not beat the
    lowest-fee tx that could be evicted."""

    code = "mempool_full"


class TooManyPending(TxRejected):
    """Raised when a sender already has the maximum number of pending txs."""

    code = "too_many_pending"

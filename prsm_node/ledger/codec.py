"""Canonical msgpack encoding of ledger transactions, receipts and account states.

Every structure is a fixed-order msgpack array (never a map); kinds are small int tags;
amounts are 16-byte big-endian unsigned ``bin`` (msgpack ints stop at 2**64, and 18-decimal
amounts do not); nonces and heights are msgpack uints in their shortest form; accounts,
receipt ids and signatures are ``bin`` of fixed length; the chain id is a ``str`` of 1..64
UTF-8 bytes. The schema is in protocols/ledger.md.

``decode_*`` is strict: its input is untrusted. Besides type/length/range checks it re-encodes
what it parsed and requires the very same bytes, so any non-minimal form (a uint32 holding 5,
a str8 holding a short string, ...) is rejected and ``encode(decode(b)) == b`` for every
accepted ``b``. ``encode_*`` raises (MalformedTx / AmountOutOfRange) rather than produce
bytes that ``decode_*`` would reject.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import msgpack

from ..breaker.exceptions import BreakerError
from ..breaker.votes import MAX_VOTE_SIZE, decode_vote, encode_vote, vote_problem
from ..strict_msgpack import unpack_strict
from .exceptions import AmountOutOfRange, LedgerDecodeError, MalformedTx, UnknownKind
from .types import (
    ACCOUNT_SIZE,
    MAX_AMOUNT,
    MAX_NONCE,
    RECEIPT_ID_SIZE,
    SIGNATURE_SIZE,
    Account,
    Body,
    BreakerVote,
    Receipt,
    Settle,
    Stake,
    Transfer,
    Tx,
    Unstake,
    VoteRecord,
)

MAX_TX_SIZE = 64 * 1024
MAX_RECEIPT_SIZE = 1024
MAX_ACCOUNT_SIZE = 64 * 1024
MAX_RECEIPTS = 256
MAX_CHAIN_ID_LEN = 64  # UTF-8 bytes
MAX_UNBONDING_ENTRIES = 4096
AMOUNT_SIZE = 16
TX_DOMAIN = "prsm-tx-v1"
RECEIPT_DOMAIN = "prsm-receipt-v1"


class Kind(enum.IntEnum):
    """Body type tags. 0 is reserved; new kinds take new numbers."""

    TRANSFER = 1
    STAKE = 2
    UNSTAKE = 3
    SETTLE = 4
    BREAKER_VOTE = 5


# ------------------------------------------------------------ object checks


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise MalformedTx(f"{what} must be {size} bytes, got {_describe(value)}")
    return value


def _check_uint(value: object, what: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise MalformedTx(f"{what} must be an integer in [0, {maximum}], got {value!r}")
    return value


def _check_amount(value: object, what: str, *, positive: bool) -> int:
    if type(value) is not int:
        raise MalformedTx(f"{what} must be an integer, got {type(value).__name__}")
    low = 1 if positive else 0
    if not low <= value <= MAX_AMOUNT:
        raise AmountOutOfRange(f"{what} {value} is out of range [{low}, 2**128-1]")
    return value


def check_chain_id(value: object, what: str = "chain id") -> str:
    if type(value) is not str:
        raise MalformedTx(f"{what} must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedTx(f"{what} {value!r} is not encodable as UTF-8") from None
    if not 1 <= size <= MAX_CHAIN_ID_LEN:
        raise MalformedTx(f"{what} must be 1..{MAX_CHAIN_ID_LEN} UTF-8 bytes, got {size}")
    return value


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def validate_receipt(r: Receipt, *, signed: bool = True) -> None:
    """Check a receipt's field types, lengths and ranges (not its signature)."""
    if not isinstance(r, Receipt):
        raise MalformedTx(f"expected a Receipt, got {type(r).__name__}")
    _check_bytes(r.receipt_id, RECEIPT_ID_SIZE, "receipt id")
    _check_bytes(r.payer, ACCOUNT_SIZE, "receipt payer")
    _check_bytes(r.payee, ACCOUNT_SIZE, "receipt payee")
    _check_amount(r.amount, f"receipt {r.receipt_id.hex()} amount", positive=False)
    check_chain_id(r.chain_id, "receipt chain id")
    if signed:
        _check_bytes(r.signature, SIGNATURE_SIZE, "receipt signature")


def validate_tx(tx: Tx, *, signed: bool = True) -> None:
    """Check a tx's field types, lengths and ranges, as the codec needs them.

    Amounts may be zero here (the ledger rejects a zero amount with AmountOutOfRange);
    with ``signed=False`` the signature is not looked at.
    """
    if not isinstance(tx, Tx):
        raise MalformedTx(f"expected a Tx, got {type(tx).__name__}")
    check_chain_id(tx.chain_id)
    _check_bytes(tx.sender, ACCOUNT_SIZE, "sender")
    _check_uint(tx.nonce, "nonce", MAX_NONCE)
    _check_amount(tx.fee, "fee", positive=False)
    body = tx.body
    if isinstance(body, Transfer):
        _check_bytes(body.to, ACCOUNT_SIZE, "transfer recipient")
        _check_amount(body.amount, "transfer amount", positive=False)
    elif isinstance(body, Stake | Unstake):
        _check_amount(body.amount, f"{type(body).__name__.lower()} amount", positive=False)
    elif isinstance(body, Settle):
        if type(body.receipts) is not tuple or not 1 <= len(body.receipts) <= MAX_RECEIPTS:
            raise MalformedTx(f"a Settle carries a tuple of 1..{MAX_RECEIPTS} receipts")
        for r in body.receipts:
            validate_receipt(r)
    elif isinstance(body, BreakerVote):
        problem = vote_problem(body.vote)
        if problem:
            raise MalformedTx(f"breaker vote: {problem}")
    else:
        raise MalformedTx(f"unknown transaction body {type(body).__name__}")
    if signed:
        _check_bytes(tx.signature, SIGNATURE_SIZE, "signature")


# ------------------------------------------------------------ encode


def _amount(value: int) -> bytes:
    return value.to_bytes(AMOUNT_SIZE, "big")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _receipt_fields(r: Receipt) -> list[Any]:
    return [r.receipt_id, r.payer, r.payee, _amount(r.amount), r.chain_id]


def _body_array(body: Body) -> list[Any]:
    if isinstance(body, Transfer):
        return [Kind.TRANSFER.value, body.to, _amount(body.amount)]
    if isinstance(body, Stake):
        return [Kind.STAKE.value, _amount(body.amount)]
    if isinstance(body, Unstake):
        return [Kind.UNSTAKE.value, _amount(body.amount)]
    if isinstance(body, BreakerVote):
        return [Kind.BREAKER_VOTE.value, encode_vote(body.vote)]
    return [Kind.SETTLE.value, [[*_receipt_fields(r), r.signature] for r in body.receipts]]


# Encodings are cached on the (frozen, immutable) objects themselves: a tx is decoded, checked,
# hashed, put in a block and stored, and an account is hashed and stored, each from one
# encoding. A Tx carrying a cached encoding has passed validate_tx (``is_validated``).
_CACHE = "_canonical"
_HASH_CACHE = "_hash"


_SIG_FIELD = 2 + SIGNATURE_SIZE  # bin8 header + 64 bytes
_PAYLOAD_PREFIX: bytes = b"\x96" + msgpack.packb(TX_DOMAIN)


def is_validated(tx: Tx) -> bool:
    """True when ``tx`` was encoded before, so every field has been validated."""
    return _CACHE in tx.__dict__


def encode_tx(tx: Tx) -> bytes:
    """The canonical bytes of a signed tx: ``[chain_id, sender, nonce, fee, body, signature]``."""
    cached: bytes | None = tx.__dict__.get(_CACHE)
    if cached is not None:
        return cached
    validate_tx(tx)
    data = _pack([tx.chain_id, tx.sender, tx.nonce, _amount(tx.fee), _body_array(tx.body), tx.signature])
    if len(data) > MAX_TX_SIZE:
        raise MalformedTx(f"encoded tx is {len(data)} bytes, over the {MAX_TX_SIZE}-byte limit")
    object.__setattr__(tx, _CACHE, data)
    return data


def signing_payload(tx: Tx) -> bytes:
    """What the sender signs: ``["prsm-tx-v1", chain_id, sender, nonce, fee, body]``."""
    encoded: bytes | None = tx.__dict__.get(_CACHE)
    if encoded is not None:
        # The same bytes, cut from the signed encoding ``[chain_id, .., body, signature]``:
        # both are 6-element arrays, and the signature is always the last 66 bytes.
        return _PAYLOAD_PREFIX + encoded[1:-_SIG_FIELD]
    validate_tx(tx, signed=False)
    return _pack([TX_DOMAIN, tx.chain_id, tx.sender, tx.nonce, _amount(tx.fee), _body_array(tx.body)])


def tx_hash(tx: Tx) -> bytes:
    """SHA-256 of the full signed encoding (signature included).

    Not a replay key: replay protection is the (sender, nonce) pair.
    """
    cached: bytes | None = tx.__dict__.get(_HASH_CACHE)
    if cached is None:
        cached = hashlib.sha256(encode_tx(tx)).digest()
        object.__setattr__(tx, _HASH_CACHE, cached)
    return cached


def encode_receipt(r: Receipt) -> bytes:
    """A signed receipt on its own (payer -> payee, off chain): ``[id, payer, payee, amount, chain_id, sig]``."""
    validate_receipt(r)
    return _pack([*_receipt_fields(r), r.signature])


def receipt_signing_payload(r: Receipt) -> bytes:
    """What the payer signs: ``["prsm-receipt-v1", receipt_id, payer, payee, amount, chain_id]``."""
    validate_receipt(r, signed=False)
    return _pack([RECEIPT_DOMAIN, *_receipt_fields(r)])


def encode_account(a: Account) -> bytes:
    """``[balance, nonce, stake, [[amount, release_height], ...]]``: hashed into the state hash."""
    cached: bytes | None = a.__dict__.get(_CACHE)
    if cached is not None:
        return cached
    data = _pack(
        [
            _amount(a.balance),
            a.nonce,
            _amount(a.stake),
            [[_amount(amount), release] for amount, release in a.unbonding],
        ]
    )
    object.__setattr__(a, _CACHE, data)
    return data


def encode_vote_record(r: VoteRecord) -> bytes:
    """``[vote: bin, height: uint]``: a recorded breaker vote (storage and the state hash)."""
    return _pack([encode_vote(r.vote), r.height])


# ------------------------------------------------------------ decode


def _unpack(data: bytes, limit: int, what: str) -> Any:
    return unpack_strict(data, limit, what, LedgerDecodeError)


def _array(value: Any, size: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) != size:
        raise LedgerDecodeError(f"{what} must be an array of {size}, got {_describe_wire(value)}")
    return value


def _bin(value: Any, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise LedgerDecodeError(f"{what} must be bin of {size} bytes, got {_describe_wire(value)}")
    return value


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_NONCE:
        raise LedgerDecodeError(f"{what} must be an unsigned integer, got {_describe_wire(value)}")
    return value


def _amt(value: Any, what: str) -> int:
    return int.from_bytes(_bin(value, AMOUNT_SIZE, what), "big")


def _chain(value: Any, what: str) -> str:
    if type(value) is not str or not 1 <= len(value.encode("utf-8")) <= MAX_CHAIN_ID_LEN:
        raise LedgerDecodeError(f"{what} must be a str of 1..{MAX_CHAIN_ID_LEN} bytes, got {_describe_wire(value)}")
    return value


def _describe_wire(value: Any) -> str:
    if isinstance(value, bytes | str | list):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _parse_receipt(value: Any, what: str) -> Receipt:
    f = _array(value, 6, what)
    return Receipt(
        receipt_id=_bin(f[0], RECEIPT_ID_SIZE, f"{what} id"),
        payer=_bin(f[1], ACCOUNT_SIZE, f"{what} payer"),
        payee=_bin(f[2], ACCOUNT_SIZE, f"{what} payee"),
        amount=_amt(f[3], f"{what} amount"),
        chain_id=_chain(f[4], f"{what} chain id"),
        signature=_bin(f[5], SIGNATURE_SIZE, f"{what} signature"),
    )


def _parse_body(value: Any) -> Body:
    if type(value) is not list or not value:
        raise LedgerDecodeError(f"body must be a non-empty array, got {_describe_wire(value)}")
    tag = value[0]
    if type(tag) is not int:
        raise LedgerDecodeError(f"body kind must be an integer, got {_describe_wire(tag)}")
    if tag == Kind.TRANSFER:
        f = _array(value, 3, "transfer body")
        return Transfer(to=_bin(f[1], ACCOUNT_SIZE, "transfer recipient"), amount=_amt(f[2], "transfer amount"))
    if tag == Kind.STAKE:
        return Stake(amount=_amt(_array(value, 2, "stake body")[1], "stake amount"))
    if tag == Kind.UNSTAKE:
        return Unstake(amount=_amt(_array(value, 2, "unstake body")[1], "unstake amount"))
    if tag == Kind.SETTLE:
        items = _array(value, 2, "settle body")[1]
        if type(items) is not list or not 1 <= len(items) <= MAX_RECEIPTS:
            got = _describe_wire(items)
            raise LedgerDecodeError(f"settle receipts must be an array of 1..{MAX_RECEIPTS}, got {got}")
        return Settle(tuple(_parse_receipt(r, f"receipt {i}") for i, r in enumerate(items)))
    if tag == Kind.BREAKER_VOTE:
        data = _array(value, 2, "breaker vote body")[1]
        if type(data) is not bytes or len(data) > MAX_VOTE_SIZE:
            raise LedgerDecodeError(f"breaker vote must be bin of at most {MAX_VOTE_SIZE} bytes")
        try:
            return BreakerVote(decode_vote(data))
        except BreakerError as exc:
            raise LedgerDecodeError(f"breaker vote: {exc}") from None
    raise UnknownKind(f"unknown transaction kind {tag}")


def _require_canonical(data: bytes, encoded: bytes, what: str) -> None:
    if bytes(data) != encoded:
        raise LedgerDecodeError(f"{what} is not in canonical form (a non-minimal msgpack encoding)")


def decode_tx(data: bytes) -> Tx:
    """Parse a signed tx from untrusted bytes; any defect raises LedgerDecodeError."""
    f = _array(_unpack(data, MAX_TX_SIZE, "tx"), 6, "tx")
    tx = Tx(
        chain_id=_chain(f[0], "chain id"),
        sender=_bin(f[1], ACCOUNT_SIZE, "sender"),
        nonce=_uint(f[2], "nonce"),
        fee=_amt(f[3], "fee"),
        body=_parse_body(f[4]),
        signature=_bin(f[5], SIGNATURE_SIZE, "signature"),
    )
    # Every field was type- and range-checked while parsing, so validate_tx would find
    # nothing: re-encode directly (this is on the hot path of every synced block).
    encoded = _pack([tx.chain_id, tx.sender, tx.nonce, _amount(tx.fee), _body_array(tx.body), tx.signature])
    _require_canonical(data, encoded, "tx")
    object.__setattr__(tx, _CACHE, encoded)
    return tx


def decode_receipt(data: bytes) -> Receipt:
    """Parse a signed receipt from untrusted bytes; any defect raises LedgerDecodeError."""
    r = _parse_receipt(_unpack(data, MAX_RECEIPT_SIZE, "receipt"), "receipt")
    _require_canonical(data, encode_receipt(r), "receipt")
    return r


def decode_account(data: bytes) -> Account:
    """Parse an account state (for storage); any defect raises LedgerDecodeError."""
    f = _array(_unpack(data, MAX_ACCOUNT_SIZE, "account"), 4, "account")
    entries = f[3]
    if type(entries) is not list or len(entries) > MAX_UNBONDING_ENTRIES:
        raise LedgerDecodeError(f"unbonding must be an array of at most {MAX_UNBONDING_ENTRIES}")
    unbonding = []
    for i, entry in enumerate(entries):
        e = _array(entry, 2, f"unbonding entry {i}")
        unbonding.append((_amt(e[0], f"unbonding entry {i} amount"), _uint(e[1], f"unbonding entry {i} height")))
    a = Account(_amt(f[0], "balance"), _uint(f[1], "nonce"), _amt(f[2], "stake"), tuple(unbonding))
    _require_canonical(data, encode_account(a), "account")
    return a


def decode_vote_record(data: bytes) -> VoteRecord:
    """Parse a recorded breaker vote (for storage); any defect raises LedgerDecodeError."""
    f = _array(_unpack(data, MAX_VOTE_SIZE + 16, "vote record"), 2, "vote record")
    if type(f[0]) is not bytes:
        raise LedgerDecodeError("a vote record's vote must be bin")
    try:
        vote = decode_vote(f[0])
    except BreakerError as exc:
        raise LedgerDecodeError(f"vote record: {exc}") from None
    r = VoteRecord(vote, _uint(f[1], "vote record height"))
    _require_canonical(data, encode_vote_record(r), "vote record")
    return r

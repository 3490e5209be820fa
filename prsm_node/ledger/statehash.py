"""The incremental state hash: an additive multiset hash (AdHash / LtHash family).

Every entry of the state (an account with its canonical state, a settled receipt key) maps to
a 2048-byte SHAKE-256 digest read as a 16384-bit integer; the accumulator is their sum modulo
2**16384. Changing one entry subtracts its old term and adds its new one, so the cost of a tx
is proportional to the entries it touches. The reported 32-byte state hash is SHA-256 over
the chain id, the height and the accumulator. See protocols/ledger.md for why the accumulator
is 16384 bits rather than 256 (Wagner's generalized birthday attack).
"""

from __future__ import annotations

import functools
import hashlib

import msgpack

from .codec import encode_account, encode_vote_record
from .types import Account, VoteRecord

ACC_BITS = 16384
ACC_BYTES = ACC_BITS // 8
ACC_MASK = (1 << ACC_BITS) - 1
ACCOUNT_TAG = b"prsm-acct-v1"
RECEIPT_TAG = b"prsm-rcpt-v1"
VOTE_TAG = b"prsm-bvote-v1"
STATE_TAG = "prsm-state-v1"


def _term(preimage: bytes) -> int:
    return int.from_bytes(hashlib.shake_256(preimage).digest(ACC_BYTES), "little")


# An account's term added at one block is subtracted at the next block that touches it. The
# cache saves that second SHAKE (~8 us) for busy accounts, for ~9 MiB of memory.
_cached_term = functools.lru_cache(maxsize=4096)(_term)


def account_term(account: bytes, state: Account, *, cached: bool = True) -> int:
    """The accumulator term of one non-empty account (an empty account contributes 0)."""
    if state.is_empty:
        return 0
    preimage = ACCOUNT_TAG + account + encode_account(state)
    return _cached_term(preimage) if cached else _term(preimage)


def receipt_term(receipt_key: bytes, *, cached: bool = True) -> int:
    """The term of a settled receipt; ``receipt_key`` is ``payer || receipt_id`` (64 bytes)."""
    preimage = RECEIPT_TAG + receipt_key
    return _cached_term(preimage) if cached else _term(preimage)


def vote_term(key: bytes, record: VoteRecord) -> int:
    """The term of a recorded breaker vote; ``key`` is ``model || voter`` (64 bytes). Not
    cached: a record is replaced at most once per vote."""
    return _term(VOTE_TAG + key + encode_vote_record(record))


def report(chain_id: str, height: int, accumulator: int) -> bytes:
    """The 32-byte state hash: SHA-256 of msgpack ``["prsm-state-v1", chain_id, height, acc]``."""
    payload = msgpack.packb([STATE_TAG, chain_id, height, accumulator.to_bytes(ACC_BYTES, "little")])
    return hashlib.sha256(payload).digest()


def from_scratch(
    accounts: dict[bytes, Account],
    settled: set[bytes] | frozenset[bytes],
    votes: dict[bytes, VoteRecord] | None = None,
) -> int:
    """The accumulator recomputed over a whole state (tests, audits, loading a snapshot)."""
    acc = 0
    for account, state in accounts.items():
        acc += account_term(account, state, cached=False)
    for key in settled:
        acc += receipt_term(key, cached=False)
    for key, record in (votes or {}).items():
        acc += vote_term(key, record)
    return acc & ACC_MASK

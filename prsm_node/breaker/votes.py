"""Circuit-breaker votes: the value type, its canonical msgpack codec and Ed25519 signatures.

A vote is one fixed-order msgpack array (the schema is in protocols/breaker.md):

    [chain_id: str, voter: bin32, model: bin32, action: uint, epoch: uint, timestamp_ms: uint,
     reason: str, signature: bin64]

``decode_vote`` is strict, like prsm_node.ledger.codec: its input is untrusted, so it checks the
size first, then every type, length and range, then re-encodes what it parsed and requires the
very same bytes (no non-minimal forms). ``encode_vote`` raises Malformed rather than write bytes
that ``decode_vote`` would reject, so ``decode_vote(encode_vote(v)) == v`` and
``encode_vote(decode_vote(b)) == b``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing
from nacl.bindings import crypto_sign_open

from ..strict_msgpack import unpack_strict
from .exceptions import BadSignature, Malformed, Replayed, Stale, Unstaked, WrongChain

VOTE_DOMAIN = "prsm-breaker-vote-v1"
MODEL_ID_SIZE = 32  # a manifest id (SHA-256 of the signed manifest)
VOTER_SIZE = 32  # raw Ed25519 public key = ledger account
SIGNATURE_SIZE = 64
MAX_REASON_BYTES = 280  # UTF-8
MAX_CHAIN_ID_BYTES = 64  # as in the ledger
MAX_UINT64 = (1 << 64) - 1
MAX_VOTE_SIZE = 1024  # the largest valid vote is 503 bytes


class Action(enum.IntEnum):
    """What a vote asks for. 0 is reserved; an unknown action is a decoding error."""

    HALT = 1
    RESUME = 2


@dataclass(frozen=True)
class Vote:
    """A signed vote by ``voter`` to halt or resume ``model`` on chain ``chain_id``.

    ``epoch`` orders one voter's votes on one model: a vote supersedes the voter's earlier vote
    for that model when its epoch is higher (a voter may use a counter or its clock in ms).
    ``timestamp_ms`` (Unix ms, the voter's clock) is only for freshness on gossip and display.
    """

    chain_id: str
    voter: bytes
    model: bytes
    action: Action
    epoch: int
    timestamp_ms: int
    reason: str = ""
    signature: bytes = b""


# ------------------------------------------------------------ checks


def _bytes_problem(value: object, size: int, what: str) -> str | None:
    if type(value) is not bytes or len(value) != size:
        return f"{what} must be {size} bytes"
    return None


def _str_problem(value: object, low: int, high: int, what: str) -> str | None:
    if type(value) is not str:
        return f"{what} must be a string"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} is not encodable as UTF-8"
    if not low <= size <= high:
        return f"{what} must be {low}..{high} UTF-8 bytes, got {size}"
    return None


def _uint_problem(value: object, what: str) -> str | None:
    if type(value) is not int or not 0 <= value <= MAX_UINT64:
        return f"{what} must be an integer in [0, 2**64-1]"
    return None


def vote_problem(vote: object, *, signed: bool = True) -> str | None:
    """What makes ``vote`` unencodable (a field's type, length or range), or None."""
    if not isinstance(vote, Vote):
        return f"expected a Vote, got {type(vote).__name__}"
    if not isinstance(vote.action, int) or isinstance(vote.action, bool) or vote.action not in _ACTIONS:
        return f"unknown action {vote.action!r}"
    return (
        _str_problem(vote.chain_id, 1, MAX_CHAIN_ID_BYTES, "chain id")
        or _bytes_problem(vote.voter, VOTER_SIZE, "voter")
        or _bytes_problem(vote.model, MODEL_ID_SIZE, "model id")
        or _uint_problem(vote.epoch, "epoch")
        or _uint_problem(vote.timestamp_ms, "timestamp")
        or _str_problem(vote.reason, 0, MAX_REASON_BYTES, "reason")
        or (_bytes_problem(vote.signature, SIGNATURE_SIZE, "signature") if signed else None)
    )


def validate_vote(vote: Vote, *, signed: bool = True) -> None:
    """Raise Malformed unless every field has its type, length and range."""
    problem = vote_problem(vote, signed=signed)
    if problem:
        raise Malformed(problem)


_ACTIONS = frozenset(int(a) for a in Action)


# ------------------------------------------------------------ encode


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _fields(vote: Vote) -> list[Any]:
    return [vote.chain_id, vote.voter, vote.model, int(vote.action), vote.epoch, vote.timestamp_ms, vote.reason]


def encode_vote(vote: Vote) -> bytes:
    """The canonical bytes of a signed vote (Malformed if a field is out of range)."""
    validate_vote(vote)
    return pack([*_fields(vote), vote.signature])


def signing_payload(vote: Vote) -> bytes:
    """What the voter signs: ``["prsm-breaker-vote-v1", chain_id, voter, model, action, epoch,
    timestamp_ms, reason]``; the domain tag keeps it from being valid as anything else."""
    validate_vote(vote, signed=False)
    return pack([VOTE_DOMAIN, *_fields(vote)])


def vote_id(vote: Vote) -> bytes:
    """SHA-256 of the signed encoding: a content id (e.g. the gossipsub message id)."""
    return hashlib.sha256(encode_vote(vote)).digest()


# ------------------------------------------------------------ decode


def unpack(data: bytes, limit: int, what: str) -> Any:
    """One msgpack value from untrusted bytes of at most ``limit`` bytes (Malformed otherwise)."""
    return unpack_strict(data, limit, what, Malformed)


def decode_vote(data: bytes) -> Vote:
    """Parse a signed vote from untrusted bytes; any defect raises Malformed.

    The signature is not checked here (``verify_vote``/``check_vote`` do that).
    """
    f = unpack(data, MAX_VOTE_SIZE, "vote")
    if type(f) is not list or len(f) != 8:
        raise Malformed("a vote is an array of 8 fields")
    action = f[3]
    if type(action) is not int or action not in _ACTIONS:
        raise Malformed(f"unknown vote action {action!r}")
    vote = Vote(
        chain_id=f[0],
        voter=f[1],
        model=f[2],
        action=Action(action),
        epoch=f[4],
        timestamp_ms=f[5],
        reason=f[6],
        signature=f[7],
    )
    if encode_vote(vote) != bytes(data):  # also runs every field check
        raise Malformed("vote is not in canonical form (a non-minimal msgpack encoding)")
    return vote


# ------------------------------------------------------------ signatures


def sign_vote(
    key: nacl.signing.SigningKey,
    *,
    chain_id: str,
    model: bytes,
    action: Action,
    epoch: int,
    timestamp_ms: int,
    reason: str = "",
) -> Vote:
    """Build and sign a vote whose voter is ``key``'s public key (Malformed if a field is bad)."""
    unsigned = Vote(
        chain_id=chain_id,
        voter=bytes(key.verify_key),
        model=model,
        action=Action(action),
        epoch=epoch,
        timestamp_ms=timestamp_ms,
        reason=reason,
    )
    return dataclasses.replace(unsigned, signature=key.sign(signing_payload(unsigned)).signature)


def verify_vote(vote: Vote) -> bool:
    """True when ``vote.signature`` is the voter's Ed25519 signature over its signing payload."""
    if vote_problem(vote) is not None:
        return False
    try:
        # libsodium directly, as prsm_node.ledger.signing does (faster on worker threads)
        crypto_sign_open(vote.signature + signing_payload(vote), vote.voter)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


# ------------------------------------------------------------ validation


def check_vote(
    vote: Vote,
    *,
    chain_id: str,
    stake_of: Callable[[bytes], int],
    now_ms: int,
    max_age_ms: int | None,
    max_future_ms: int | None,
    last_epoch_of: Callable[[bytes, bytes], int | None],
) -> None:
    """Raise the VoteRejected subclass that says why ``vote`` must not be counted or relayed.

    Pure: ``stake_of(voter)`` is the voter's stake in the current stake table and
    ``last_epoch_of(voter, model)`` the epoch of its last counted vote on that model (None:
    none). Gossip passes the genesis freshness window; catch-up passes ``max_age_ms=None``
    (a vote that is still the voter's latest is current however old it is) but keeps
    ``max_future_ms``. Rules run cheapest first; the signature (~100 us) is checked last:

    Malformed -> WrongChain -> Stale -> Unstaked -> Replayed -> BadSignature.
    """
    validate_vote(vote)
    if vote.chain_id != chain_id:
        raise WrongChain(f"vote for chain {vote.chain_id!r}, this network is {chain_id!r}")
    if max_age_ms is not None and vote.timestamp_ms < now_ms - max_age_ms:
        raise Stale(f"vote timestamp {vote.timestamp_ms} is more than {max_age_ms} ms before {now_ms}")
    if max_future_ms is not None and vote.timestamp_ms > now_ms + max_future_ms:
        raise Stale(f"vote timestamp {vote.timestamp_ms} is more than {max_future_ms} ms after {now_ms}")
    if stake_of(vote.voter) <= 0:
        raise Unstaked(f"voter {vote.voter.hex()} has no stake")
    last = last_epoch_of(vote.voter, vote.model)
    if last is not None and vote.epoch <= last:
        raise Replayed(vote.voter, vote.model, last, vote.epoch)
    if not verify_vote(vote):
        raise BadSignature(f"vote by {vote.voter.hex()} on model {vote.model.hex()}: the signature does not verify")

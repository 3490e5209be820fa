"""Errors of the circuit breaker core. Every one derives from BreakerError.

``VoteRejected`` and its subclasses mean "this vote was not counted and the tally is exactly
as before". ``peer_fault`` tells the gossipsub validator what to do with the peer that
forwarded it: True (``Malformed``, ``WrongChain``, ``BadSignature``) means no honest node
would have forwarded the vote, so reject it and penalise the peer; False (``Unstaked``,
``Stale``, ``Replayed``) means an honest peer may see it differently (stake changed in the
last block, clocks, a vote crossing on two paths), so drop it without a penalty.
"""

from __future__ import annotations

from ..exceptions import PrsmError


class BreakerError(PrsmError):
    """Root of every error raised on purpose by prsm_node.breaker."""

    code = "breaker_error"


class VoteRejected(BreakerError):
    """Raised when a vote cannot be counted; nothing was changed."""

    code = "rejected"
    peer_fault = True


class Malformed(VoteRejected):
    """Raised when bytes are not a canonical vote or catch-up message (bad msgpack, a wrong
    field type or length, trailing bytes, a non-minimal form, over a size limit), or a vote
    object has a field out of its range (a reason over 280 UTF-8 bytes, an epoch over 2**64-1)."""

    code = "malformed"


class UnknownMessageType(Malformed):
    """Raised when a ``/prsm/breaker/1.0.0`` message carries a type id this version does not
    know, or a response type where a request was expected."""

    code = "unknown_type"


class WrongChain(VoteRejected):
    """Raised when a vote names another chain id than this network's."""

    code = "wrong_chain"


class BadSignature(VoteRejected):
    """Raised when a vote's signature is not the voter's Ed25519 signature over its signing
    payload."""

    code = "bad_signature"


class Unstaked(VoteRejected):
    """Raised when the voter has no stake in the current stake table."""

    code = "unstaked"
    peer_fault = False


class Stale(VoteRejected):
    """Raised when a vote's timestamp is older than the freshness window or further in the
    future than the allowed clock skew (gossip only; catch-up has no age limit)."""

    code = "stale"
    peer_fault = False


class Replayed(VoteRejected):
    """Raised when a vote's epoch is not above the epoch of the voter's last counted vote for
    that model (a replay, a duplicate, or an older vote arriving after a newer one)."""

    code = "replayed"
    peer_fault = False

    def __init__(self, voter: bytes, model: bytes, last: int, got: int) -> None:
        super().__init__(f"voter {voter.hex()} model {model.hex()}: epoch {got} is not above {last}")
        self.voter = voter
        self.model = model
        self.last = last
        self.got = got


class RateLimited(VoteRejected):
    """Raised when a voter exceeds a vote limit (protocols/breaker.md, "Vote limits"): more
    than ``max_votes_per_model`` votes on one model, or votes on more than
    ``max_models_per_voter`` models, in one window. Not the forwarder's fault by itself (an
    honest relay counts in its own window); a relay far over the limits is penalised apart."""

    code = "rate_limited"
    peer_fault = False


class NotRunning(BreakerError):
    """Raised when a vote is to be published while the breaker service is not running."""

    code = "not_running"


class BreakerParamsError(BreakerError):
    """Raised when a ``breaker_*`` genesis parameter is malformed or out of range (a float
    threshold, a zero denominator, a halt threshold above the resume threshold)."""

    code = "genesis_error"


class BreakerStoreError(BreakerError):
    """Raised when the breaker namespace holds a record that does not decode (a corrupt or
    foreign database): the node must not guess which models are halted."""

    code = "store_corrupt"

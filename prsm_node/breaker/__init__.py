"""The circuit breaker core: signed halt/resume votes, their validation, the stake-weighted
tally with hysteresis, persistence and the catch-up messages.

No sockets and no clocks: the gossipsub service (topic ``prsm/breaker/1``) and the catch-up
protocol ``/prsm/breaker/1.0.0`` build on this API. The rules and formats are in
protocols/breaker.md.
"""

from __future__ import annotations

from .exceptions import (
    BadSignature,
    BreakerError,
    BreakerParamsError,
    BreakerStoreError,
    Malformed,
    Replayed,
    Stale,
    UnknownMessageType,
    Unstaked,
    VoteRejected,
    WrongChain,
)
from .messages import (
    PROTOCOL_ID,
    ErrorCode,
    GetVotes,
    Votes,
    catchup_order,
    decode_message,
    decode_request,
    encode_message,
    next_request,
    select_votes,
)
from .messages import Error as ErrorMessage
from .params import BreakerParams
from .store import BreakerStore
from .tally import (
    Added,
    Cause,
    ModelRecord,
    ModelState,
    ModelStatus,
    Stakes,
    StakeTable,
    Tally,
    Transition,
    VoterStatus,
)
from .votes import (
    MAX_REASON_BYTES,
    MAX_VOTE_SIZE,
    Action,
    Vote,
    check_vote,
    decode_vote,
    encode_vote,
    sign_vote,
    signing_payload,
    verify_vote,
    vote_id,
)

TOPIC = "prsm/breaker/1"

__all__ = [
    "MAX_REASON_BYTES",
    "MAX_VOTE_SIZE",
    "PROTOCOL_ID",
    "TOPIC",
    "Action",
    "Added",
    "BadSignature",
    "BreakerError",
    "BreakerParams",
    "BreakerParamsError",
    "BreakerStore",
    "BreakerStoreError",
    "Cause",
    "ErrorCode",
    "ErrorMessage",
    "GetVotes",
    "Malformed",
    "ModelRecord",
    "ModelState",
    "ModelStatus",
    "Replayed",
    "StakeTable",
    "Stakes",
    "Stale",
    "Tally",
    "Transition",
    "UnknownMessageType",
    "Unstaked",
    "Vote",
    "VoteRejected",
    "VoterStatus",
    "Votes",
    "WrongChain",
    "catchup_order",
    "check_vote",
    "decode_message",
    "decode_request",
    "decode_vote",
    "encode_message",
    "encode_vote",
    "next_request",
    "select_votes",
    "sign_vote",
    "signing_payload",
    "verify_vote",
    "vote_id",
]

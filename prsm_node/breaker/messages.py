"""Message bodies of ``/prsm/breaker/1.0.0``, the catch-up protocol (framing: prsm_node.wire).

A node that (re)joins asks peers for the votes they count, page by page:

    1 GET_VOTES   [1, model: bin0|bin32, since_ms: uint, after: bin0|bin72]  -> VOTES | ERROR
    2 VOTES       [2, votes: [Vote bytes: bin, ...], more: 0|1]
    3 ERROR       [3, code: uint, message: str]
    4 GET_DIGEST  [4, before_ms: uint]                                       -> DIGEST | ERROR
    5 DIGEST      [5, before_ms: uint, digest: bin3072]
    6 GET_BUCKETS [6, buckets: bin32, before_ms: uint, after: bin0|bin64]    -> VOTES | ERROR

Votes are served in catch-up order, ``(timestamp_ms, model, voter, epoch)``; a request asks
for the votes after the cursor ``(since_ms, after)``, where ``after`` is the last vote's
``model || voter || epoch (8 bytes, big-endian)`` or empty (then every vote with
``timestamp_ms >= since_ms``). An empty ``model`` means every model. The requester checks each
vote with check_vote without an age limit (see protocols/breaker.md, "Catch-up").

Decoding is strict like the vote codec: size limit first, exact field types and lengths,
every vote decoded strictly, then a re-encode that must give the same bytes.

GET_DIGEST / DIGEST / GET_BUCKETS are the anti-entropy exchange (protocols/breaker.md,
"Anti-entropy"): a digest summarises the latest votes older than ``before_ms`` in 256
buckets (by the model id's first byte); the requester then fetches only the buckets that
differ from its own.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from ..strict_msgpack import error_reply_problem
from .exceptions import Malformed, UnknownMessageType
from .votes import MAX_UINT64, MAX_VOTE_SIZE, MODEL_ID_SIZE, VOTER_SIZE, Vote, decode_vote, encode_vote, pack, unpack

PROTOCOL_ID = "/prsm/breaker/1.0.0"
MAX_VOTES_PER_REPLY = 256
CURSOR_SIZE = MODEL_ID_SIZE + VOTER_SIZE + 8
MAX_REQUEST_SIZE = 128
MAX_ERROR_MESSAGE = 256  # UTF-8 bytes
MAX_REPLY_SIZE = MAX_VOTES_PER_REPLY * (MAX_VOTE_SIZE + 3) + 16
MAX_MESSAGE_SIZE = MAX_REPLY_SIZE
BUCKETS = 256
DIGEST_ENTRY = 12  # count: uint32 big-endian, then the XOR of the 8-byte vote keys
DIGEST_SIZE = BUCKETS * DIGEST_ENTRY
BUCKET_SET_SIZE = BUCKETS // 8
BUCKET_CURSOR_SIZE = MODEL_ID_SIZE + VOTER_SIZE


class MsgType(enum.IntEnum):
    GET_VOTES = 1
    VOTES = 2
    ERROR = 3
    GET_DIGEST = 4
    DIGEST = 5
    GET_BUCKETS = 6


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 1  # a request that does not decode or breaks a rule
    TOO_LARGE = 2  # a frame over the limit for its type
    BUSY = 3  # too many requests from this peer; retry later
    INTERNAL = 4  # the responder failed


@dataclass(frozen=True)
class GetVotes:
    """``model``: b"" for every model; ``after``: b"" or a CURSOR_SIZE cursor (see module doc)."""

    TYPE: ClassVar[MsgType] = MsgType.GET_VOTES
    model: bytes = b""
    since_ms: int = 0
    after: bytes = b""


@dataclass(frozen=True)
class Votes:
    """Up to MAX_VOTES_PER_REPLY votes in catch-up order; ``more``: ask again from the last."""

    TYPE: ClassVar[MsgType] = MsgType.VOTES
    votes: tuple[Vote, ...]
    more: bool = False


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: ErrorCode
    message: str = ""


@dataclass(frozen=True)
class GetDigest:
    """Ask for the digest of the latest votes with ``timestamp_ms < before_ms``."""

    TYPE: ClassVar[MsgType] = MsgType.GET_DIGEST
    before_ms: int


@dataclass(frozen=True)
class Digest:
    """DIGEST_SIZE bytes: per bucket, the vote count and the XOR of the votes' keys."""

    TYPE: ClassVar[MsgType] = MsgType.DIGEST
    before_ms: int
    digest: bytes


@dataclass(frozen=True)
class GetBuckets:
    """Ask for the latest votes with ``timestamp_ms < before_ms`` in the buckets set in
    ``buckets`` (bit i: ``buckets[i // 8] >> (i % 8) & 1``), in (model, voter) order after
    the cursor ``after`` (b"" or model || voter)."""

    TYPE: ClassVar[MsgType] = MsgType.GET_BUCKETS
    buckets: bytes
    before_ms: int
    after: bytes = b""


Message: TypeAlias = GetVotes | Votes | Error | GetDigest | Digest | GetBuckets
Request: TypeAlias = GetVotes | GetDigest | GetBuckets
_ERROR_CODES = frozenset(int(c) for c in ErrorCode)


# ------------------------------------------------------------ catch-up order and paging


def catchup_key(vote: Vote) -> tuple[int, bytes, bytes, int]:
    return (vote.timestamp_ms, vote.model, vote.voter, vote.epoch)


def catchup_order(votes: Iterable[Vote]) -> list[Vote]:
    """Votes in the order a catch-up applies them: by timestamp, as the network saw them."""
    return sorted(votes, key=catchup_key)


def cursor(vote: Vote) -> bytes:
    return vote.model + vote.voter + vote.epoch.to_bytes(8, "big")


def select_votes(votes: Iterable[Vote], request: GetVotes, *, limit: int = MAX_VOTES_PER_REPLY) -> Votes:
    """The responder's answer to ``request`` from the votes it serves (Tally.catchup_votes),
    at most ``limit`` (<= MAX_VOTES_PER_REPLY) of them."""
    if request.after:
        start: tuple[int, bytes, bytes, int] = (
            request.since_ms,
            request.after[:MODEL_ID_SIZE],
            request.after[MODEL_ID_SIZE : MODEL_ID_SIZE + VOTER_SIZE],
            int.from_bytes(request.after[-8:], "big"),
        )
        chosen = [v for v in votes if catchup_key(v) > start]
    else:
        chosen = [v for v in votes if v.timestamp_ms >= request.since_ms]
    if request.model:
        chosen = [v for v in chosen if v.model == request.model]
    chosen.sort(key=catchup_key)
    limit = min(limit, MAX_VOTES_PER_REPLY)
    return Votes(tuple(chosen[:limit]), more=len(chosen) > limit)


# ------------------------------------------------------------ anti-entropy digests


def bucket_of(model: bytes) -> int:
    return model[0]


def vote_key8(vote: Vote) -> int:
    """The 8-byte key a digest XORs: SHA-256(model || voter || uint64_be(epoch))[:8]."""
    return int.from_bytes(hashlib.sha256(vote.model + vote.voter + vote.epoch.to_bytes(8, "big")).digest()[:8], "big")


def make_digest(votes: Iterable[Vote], before_ms: int) -> bytes:
    """The DIGEST bytes of ``votes`` (latest votes) with ``timestamp_ms < before_ms``."""
    counts = [0] * BUCKETS
    xors = [0] * BUCKETS
    for v in votes:
        if v.timestamp_ms < before_ms:
            b = bucket_of(v.model)
            counts[b] += 1
            xors[b] ^= vote_key8(v)
    return b"".join(c.to_bytes(4, "big") + x.to_bytes(8, "big") for c, x in zip(counts, xors, strict=True))


def differing_buckets(mine: bytes, theirs: bytes) -> list[int]:
    return [
        i
        for i in range(BUCKETS)
        if mine[i * DIGEST_ENTRY : (i + 1) * DIGEST_ENTRY] != theirs[i * DIGEST_ENTRY : (i + 1) * DIGEST_ENTRY]
    ]


def bucket_set(buckets: Iterable[int]) -> bytes:
    out = bytearray(BUCKET_SET_SIZE)
    for b in buckets:
        out[b >> 3] |= 1 << (b & 7)
    return bytes(out)


def in_bucket_set(buckets: bytes, model: bytes) -> bool:
    b = bucket_of(model)
    return bool(buckets[b >> 3] >> (b & 7) & 1)


def select_bucket_votes(votes: Iterable[Vote], request: GetBuckets, *, limit: int = MAX_VOTES_PER_REPLY) -> Votes:
    """The answer to GET_BUCKETS from the latest votes (Tally.votes), at most ``limit``."""
    chosen = [
        v
        for v in votes
        if v.timestamp_ms < request.before_ms
        and in_bucket_set(request.buckets, v.model)
        and (not request.after or v.model + v.voter > request.after)
    ]
    chosen.sort(key=lambda v: v.model + v.voter)
    limit = min(limit, MAX_VOTES_PER_REPLY)
    return Votes(tuple(chosen[:limit]), more=len(chosen) > limit)


def next_bucket_request(request: GetBuckets, reply: Votes) -> GetBuckets | None:
    if not reply.more or not reply.votes:
        return None
    last = reply.votes[-1]
    return GetBuckets(request.buckets, request.before_ms, last.model + last.voter)


def next_request(request: GetVotes, reply: Votes) -> GetVotes | None:
    """The request for the page after ``reply`` (None when it was the last page)."""
    if not reply.more or not reply.votes:
        return None
    last = reply.votes[-1]
    return GetVotes(request.model, last.timestamp_ms, cursor(last))


# ------------------------------------------------------------ checks


def _problem(msg: Message) -> str | None:
    if isinstance(msg, GetVotes):
        if type(msg.model) is not bytes or len(msg.model) not in (0, MODEL_ID_SIZE):
            return f"model must be empty or {MODEL_ID_SIZE} bytes"
        if type(msg.since_ms) is not int or not 0 <= msg.since_ms <= MAX_UINT64:
            return "since_ms must be an integer in [0, 2**64-1]"
        if type(msg.after) is not bytes or len(msg.after) not in (0, CURSOR_SIZE):
            return f"after must be empty or {CURSOR_SIZE} bytes"
        return None
    if isinstance(msg, Votes):
        if type(msg.votes) is not tuple or len(msg.votes) > MAX_VOTES_PER_REPLY:
            return f"votes must be a tuple of at most {MAX_VOTES_PER_REPLY}"
        if type(msg.more) is not bool:
            return "more must be a bool"
        return None
    if isinstance(msg, Error):
        return error_reply_problem(msg.code, msg.message, _ERROR_CODES, MAX_ERROR_MESSAGE)
    if isinstance(msg, GetDigest | Digest | GetBuckets):
        if type(msg.before_ms) is not int or not 0 <= msg.before_ms <= MAX_UINT64:
            return "before_ms must be an integer in [0, 2**64-1]"
        if isinstance(msg, Digest) and (type(msg.digest) is not bytes or len(msg.digest) != DIGEST_SIZE):
            return f"digest must be {DIGEST_SIZE} bytes"
        if isinstance(msg, GetBuckets):
            if type(msg.buckets) is not bytes or len(msg.buckets) != BUCKET_SET_SIZE:
                return f"buckets must be {BUCKET_SET_SIZE} bytes"
            if type(msg.after) is not bytes or len(msg.after) not in (0, BUCKET_CURSOR_SIZE):
                return f"after must be empty or {BUCKET_CURSOR_SIZE} bytes"
        return None
    return f"not a breaker message: {type(msg).__name__}"


def _fields(msg: Message) -> list[Any]:
    if isinstance(msg, GetVotes):
        return [msg.model, msg.since_ms, msg.after]
    if isinstance(msg, Votes):
        return [[encode_vote(v) for v in msg.votes], int(msg.more)]
    if isinstance(msg, GetDigest):
        return [msg.before_ms]
    if isinstance(msg, Digest):
        return [msg.before_ms, msg.digest]
    if isinstance(msg, GetBuckets):
        return [msg.buckets, msg.before_ms, msg.after]
    return [int(msg.code), msg.message]


# ------------------------------------------------------------ encode / decode


def encode_message(msg: Message) -> bytes:
    """The canonical body of ``msg`` (Malformed if it breaks a rule)."""
    problem = _problem(msg)
    if problem:
        raise Malformed(problem)
    return pack([int(msg.TYPE), *_fields(msg)])


def _build(value: Any) -> Message:
    if type(value) is not list or not value or type(value[0]) is not int:
        raise Malformed("a breaker message is an array starting with its type id")
    try:
        kind = MsgType(value[0])
    except ValueError:
        raise UnknownMessageType(f"unknown breaker message type {value[0]}") from None
    f = value[1:]
    arity = {
        MsgType.GET_VOTES: 3,
        MsgType.VOTES: 2,
        MsgType.ERROR: 2,
        MsgType.GET_DIGEST: 1,
        MsgType.DIGEST: 2,
        MsgType.GET_BUCKETS: 3,
    }[kind]
    if len(f) != arity:
        raise Malformed(f"{kind.name} has {arity} fields, got {len(f)}")
    if kind is MsgType.GET_VOTES:
        return GetVotes(f[0], f[1], f[2])
    if kind is MsgType.GET_DIGEST:
        return GetDigest(f[0])
    if kind is MsgType.DIGEST:
        return Digest(f[0], f[1])
    if kind is MsgType.GET_BUCKETS:
        return GetBuckets(f[0], f[1], f[2])
    if kind is MsgType.VOTES:
        if type(f[0]) is not list or len(f[0]) > MAX_VOTES_PER_REPLY:
            raise Malformed(f"VOTES carries an array of at most {MAX_VOTES_PER_REPLY} votes")
        if type(f[1]) is not int or f[1] not in (0, 1):
            raise Malformed("VOTES more must be 0 or 1")
        return Votes(tuple(decode_vote(v) for v in f[0]), more=bool(f[1]))
    if type(f[0]) is not int or f[0] not in _ERROR_CODES:
        raise Malformed(f"unknown error code {f[0]!r}")
    return Error(ErrorCode(f[0]), f[1])


def decode_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """Parse one message body from untrusted bytes; any defect raises Malformed."""
    msg = _build(unpack(data, max_size, "breaker message"))
    problem = _problem(msg)
    if problem:
        raise Malformed(f"{msg.TYPE.name}: {problem}")
    if encode_message(msg) != bytes(data):
        raise Malformed(f"{msg.TYPE.name} is not in canonical form")
    return msg


def decode_request(data: bytes) -> Request:
    """Parse a request (GET_VOTES, GET_DIGEST, GET_BUCKETS) of at most MAX_REQUEST_SIZE bytes."""
    msg = decode_message(data, max_size=MAX_REQUEST_SIZE)
    if not isinstance(msg, GetVotes | GetDigest | GetBuckets):
        raise UnknownMessageType(f"{msg.TYPE.name} is not a request")
    return msg

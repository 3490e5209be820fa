"""PBFT message types, their canonical msgpack codec and signing payloads (``/prsm/pbft/1.0.0``).

Every message is a fixed-order msgpack array ``[kind, sender, *fields, signature]``; the
sender signs ``["prsm-pbft-v1", chain_id, kind, sender, *fields]`` (Ed25519, raw 32-byte key),
except that a PRE-PREPARE's batch is not signed: its digest is. The chain id is never on the
wire; a message for another chain fails its signature. Nested structures (certificates, the
VIEW-CHANGE messages inside a NEW-VIEW) are arrays too. Booleans never appear (0/1 uints).
The schema and the rules are in protocols/pbft.md.

``decode`` is strict, as in prsm_node.ledger.codec: size limit first, then types, lengths
and counts, and finally a re-encode that must give the very same bytes, so every accepted
input is canonical. ``encode`` raises ConsensusDecodeError rather than write bytes that
``decode`` would reject. Semantic checks (who may sign what, quorum sizes, signatures) are
the replica's: see certs.py.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import msgpack
import nacl.exceptions
import nacl.signing

from ..strict_msgpack import unpack_strict
from .exceptions import ConsensusDecodeError

PROTOCOL_ID = "/prsm/pbft/1.0.0"
DOMAIN = "prsm-pbft-v1"
BATCH_DOMAIN = "prsm-pbft-batch-v1"

KEY_SIZE = 32
DIGEST_SIZE = 32
SIGNATURE_SIZE = 64
MAX_UINT = (1 << 64) - 1
MAX_MESSAGE_SIZE = 8 * 1024 * 1024
MAX_REQUEST_SIZE = 64 * 1024
MAX_BATCH_REQUESTS = 4096  # hard wire cap; PbftParams.max_batch_requests is the policy
MAX_BATCH_BYTES = 4 * 1024 * 1024  # sum of request lengths; PbftParams.max_batch_bytes is the policy
MAX_VALIDATORS = 64
MAX_LOG_WINDOW = 256  # prepared certificates per VIEW-CHANGE, pre-prepares per NEW-VIEW
MAX_CHAIN_ID_LEN = 64

Sig: TypeAlias = tuple[bytes, bytes]
"""One signer in a certificate: ``(validator key, signature)``."""
Batch: TypeAlias = tuple[bytes, ...]
Verify: TypeAlias = Callable[[bytes, bytes, bytes], bool]
"""``verify(public_key, payload, signature) -> bool``."""


class Kind(enum.IntEnum):
    """Message type tags. 0 is reserved; new kinds take new numbers."""

    REQUEST = 1
    PRE_PREPARE = 2
    PREPARE = 3
    COMMIT = 4
    CHECKPOINT = 5
    VIEW_CHANGE = 6
    NEW_VIEW = 7
    STATUS = 8
    COMMITTED = 9


# ------------------------------------------------------------ types


@dataclass(frozen=True)
class Request:
    """A validator forwards an opaque request (a signed ledger tx) to the primary."""

    sender: bytes
    request: bytes
    signature: bytes = b""
    kind = Kind.REQUEST


@dataclass(frozen=True)
class PrePrepare:
    """The primary assigns ``seq`` to the batch with ``digest`` in ``view``. ``batch`` rides
    along unsigned; it is ``()`` when only the signed header matters (certificates, evidence)."""

    sender: bytes
    view: int
    seq: int
    digest: bytes
    batch: Batch = ()
    signature: bytes = b""
    kind = Kind.PRE_PREPARE


@dataclass(frozen=True)
class Prepare:
    sender: bytes
    view: int
    seq: int
    digest: bytes
    signature: bytes = b""
    kind = Kind.PREPARE


@dataclass(frozen=True)
class Commit:
    sender: bytes
    view: int
    seq: int
    digest: bytes
    signature: bytes = b""
    kind = Kind.COMMIT


@dataclass(frozen=True)
class Checkpoint:
    """The sender's state digest after executing ``seq`` (a multiple of K)."""

    sender: bytes
    seq: int
    state_digest: bytes
    signature: bytes = b""
    kind = Kind.CHECKPOINT


@dataclass(frozen=True)
class PreparedCert:
    """Proof that ``(view, seq, digest)`` prepared: the primary's PRE-PREPARE signature and
    at least 2f PREPARE signatures of other validators, all over that triple."""

    view: int
    seq: int
    digest: bytes
    pre_prepare_sig: bytes
    prepares: tuple[Sig, ...]


@dataclass(frozen=True)
class CommitCertificate:
    """Proof that ``(view, seq, digest)`` committed: a quorum of COMMIT signatures. What a
    non-validator checks to accept a block (certs.verify_commit_certificate)."""

    view: int
    seq: int
    digest: bytes
    commits: tuple[Sig, ...]


@dataclass(frozen=True)
class ViewChange:
    """The sender moves to ``view``: its last stable checkpoint with its certificate (empty
    at seq 0) and its prepared certificates above it, in ascending seq."""

    sender: bytes
    view: int
    stable_seq: int
    state_digest: bytes
    checkpoint_cert: tuple[Sig, ...]
    prepared: tuple[PreparedCert, ...]
    signature: bytes = b""
    kind = Kind.VIEW_CHANGE


@dataclass(frozen=True)
class OEntry:
    """One re-proposed PRE-PREPARE of a NEW-VIEW (the new primary's signature over it)."""

    seq: int
    digest: bytes
    signature: bytes


@dataclass(frozen=True)
class NewView:
    sender: bytes
    view: int
    view_changes: tuple[ViewChange, ...]
    pre_prepares: tuple[OEntry, ...]
    signature: bytes = b""
    kind = Kind.NEW_VIEW


@dataclass(frozen=True)
class Status:
    """Periodic "here is where I am" that asks peers to retransmit what the sender lacks.
    ``has_view`` is 1 when the sender is active in ``view`` and holds its NEW-VIEW."""

    sender: bytes
    view: int
    has_view: bool
    stable_seq: int
    last_executed: int
    signature: bytes = b""
    kind = Kind.STATUS


@dataclass(frozen=True)
class Committed:
    """A committed batch with its commit certificate, forwarded to a validator that lags."""

    sender: bytes
    batch: Batch
    certificate: CommitCertificate
    signature: bytes = b""
    kind = Kind.COMMITTED


Message: TypeAlias = (
    Request | PrePrepare | Prepare | Commit | Checkpoint | ViewChange | NewView | Status | Committed
)


# ------------------------------------------------------------ digests


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def request_digest(request: bytes) -> bytes:
    """SHA-256 of the request bytes (for a ledger tx, the same as its tx hash)."""
    return hashlib.sha256(request).digest()


def batch_digest(chain_id: str, batch: Sequence[bytes]) -> bytes:
    """``SHA-256(msgpack(["prsm-pbft-batch-v1", chain_id, [request, ...]]))``."""
    return hashlib.sha256(_pack([BATCH_DOMAIN, chain_id, list(batch)])).digest()


# ------------------------------------------------------------ signing


class Signer(Protocol):
    """Signs payloads with one validator key (the replica never sees the private key)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, payload: bytes) -> bytes: ...


class KeySigner:
    """A Signer over a pynacl SigningKey."""

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._key = key
        self._public = bytes(key.verify_key)

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload).signature


def verify_signature(public_key: bytes, payload: bytes, signature: bytes) -> bool:
    """Ed25519 verification (pynacl); False on any defect."""
    try:
        nacl.signing.VerifyKey(public_key).verify(payload, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


def _sigs(sigs: Sequence[Sig]) -> list[list[bytes]]:
    return [[k, s] for k, s in sigs]


def _prepared_array(c: PreparedCert) -> list[Any]:
    return [c.view, c.seq, c.digest, c.pre_prepare_sig, _sigs(c.prepares)]


def _cert_array(c: CommitCertificate) -> list[Any]:
    return [c.view, c.seq, c.digest, _sigs(c.commits)]


def _signed_fields(m: Message) -> list[Any]:
    if isinstance(m, Request):
        return [m.request]
    if isinstance(m, PrePrepare | Prepare | Commit):
        return [m.view, m.seq, m.digest]
    if isinstance(m, Checkpoint):
        return [m.seq, m.state_digest]
    if isinstance(m, ViewChange):
        return [
            m.view,
            m.stable_seq,
            m.state_digest,
            _sigs(m.checkpoint_cert),
            [_prepared_array(c) for c in m.prepared],
        ]
    if isinstance(m, NewView):
        return [m.view, [_wire(vc) for vc in m.view_changes], [[o.seq, o.digest, o.signature] for o in m.pre_prepares]]
    if isinstance(m, Status):
        return [m.view, int(m.has_view), m.stable_seq, m.last_executed]
    return [list(m.batch), _cert_array(m.certificate)]


def _wire(m: Message) -> list[Any]:
    fields = _signed_fields(m)
    if isinstance(m, PrePrepare):
        fields.append(list(m.batch))
    return [m.kind.value, m.sender, *fields, m.signature]


def signing_payload(m: Message, chain_id: str) -> bytes:
    """What the sender signs: ``["prsm-pbft-v1", chain_id, kind, sender, *fields]``
    (for a PRE-PREPARE the fields are ``view, seq, digest``: the batch is bound by its digest)."""
    return _pack([DOMAIN, chain_id, m.kind.value, m.sender, *_signed_fields(m)])


def encode(m: Message) -> bytes:
    """The canonical wire bytes of a signed message."""
    data = _pack(_wire(m))
    # Every field check lives in the parser; running it here too keeps encode from ever
    # writing bytes that decode would refuse.
    _parse(_unpack(data))
    if len(data) > MAX_MESSAGE_SIZE:
        raise ConsensusDecodeError(f"{m.kind.name} is {len(data)} bytes, over the {MAX_MESSAGE_SIZE}-byte limit")
    return data


def encode_trusted(m: Message) -> bytes:
    """``encode`` without the re-parse, for messages a replica built itself from checked
    parts (about 3x cheaper); the size limit still applies."""
    data = _pack(_wire(m))
    if len(data) > MAX_MESSAGE_SIZE:
        raise ConsensusDecodeError(f"{m.kind.name} is {len(data)} bytes, over the {MAX_MESSAGE_SIZE}-byte limit")
    return data


def message_hash(m: Message) -> bytes:
    """SHA-256 of the wire bytes (signature included): an id for logs and dedupe."""
    return hashlib.sha256(encode(m)).digest()


# ------------------------------------------------------------ decode


def _unpack(data: bytes, limit: int = MAX_MESSAGE_SIZE) -> Any:
    return unpack_strict(data, limit, "message", ConsensusDecodeError)


def _describe(value: Any) -> str:
    if isinstance(value, bytes | str | list):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _array(value: Any, size: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) != size:
        raise ConsensusDecodeError(f"{what} must be an array of {size}, got {_describe(value)}")
    return value


def _list(value: Any, maximum: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) > maximum:
        raise ConsensusDecodeError(f"{what} must be an array of at most {maximum}, got {_describe(value)}")
    return value


def _bin(value: Any, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise ConsensusDecodeError(f"{what} must be bin of {size} bytes, got {_describe(value)}")
    return value


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_UINT:
        raise ConsensusDecodeError(f"{what} must be an unsigned 64-bit integer, got {_describe(value)}")
    return value


def _request(value: Any, what: str) -> bytes:
    if type(value) is not bytes or not 1 <= len(value) <= MAX_REQUEST_SIZE:
        raise ConsensusDecodeError(f"{what} must be bin of 1..{MAX_REQUEST_SIZE} bytes, got {_describe(value)}")
    return value


def _batch(value: Any) -> Batch:
    items = _list(value, MAX_BATCH_REQUESTS, "batch")
    batch = tuple(_request(r, f"request {i}") for i, r in enumerate(items))
    if sum(len(r) for r in batch) > MAX_BATCH_BYTES:
        raise ConsensusDecodeError(f"batch holds more than {MAX_BATCH_BYTES} request bytes")
    return batch


def _sig_list(value: Any, what: str) -> tuple[Sig, ...]:
    out = []
    for i, item in enumerate(_list(value, MAX_VALIDATORS, what)):
        pair = _array(item, 2, f"{what} entry {i}")
        out.append((_bin(pair[0], KEY_SIZE, f"{what} {i} key"), _bin(pair[1], SIGNATURE_SIZE, f"{what} {i} signature")))
    return tuple(out)


def _prepared(value: Any, i: int) -> PreparedCert:
    f = _array(value, 5, f"prepared certificate {i}")
    return PreparedCert(
        view=_uint(f[0], "prepared view"),
        seq=_uint(f[1], "prepared seq"),
        digest=_bin(f[2], DIGEST_SIZE, "prepared digest"),
        pre_prepare_sig=_bin(f[3], SIGNATURE_SIZE, "pre-prepare signature"),
        prepares=_sig_list(f[4], "prepares"),
    )


def _certificate(value: Any) -> CommitCertificate:
    f = _array(value, 4, "commit certificate")
    return CommitCertificate(
        view=_uint(f[0], "certificate view"),
        seq=_uint(f[1], "certificate seq"),
        digest=_bin(f[2], DIGEST_SIZE, "certificate digest"),
        commits=_sig_list(f[3], "commits"),
    )


_SIZES = {
    Kind.REQUEST: 4,
    Kind.PRE_PREPARE: 7,
    Kind.PREPARE: 6,
    Kind.COMMIT: 6,
    Kind.CHECKPOINT: 5,
    Kind.VIEW_CHANGE: 8,
    Kind.NEW_VIEW: 6,
    Kind.STATUS: 7,
    Kind.COMMITTED: 5,
}


def _parse(value: Any, *, nested: bool = False) -> Message:
    if type(value) is not list or not value or type(value[0]) is not int:
        raise ConsensusDecodeError(f"a message must be an array starting with its kind, got {_describe(value)}")
    try:
        kind = Kind(value[0])
    except ValueError:
        raise ConsensusDecodeError(f"unknown message kind {value[0]}") from None
    if nested and kind is not Kind.VIEW_CHANGE:
        raise ConsensusDecodeError(f"a NEW-VIEW may only carry VIEW-CHANGE messages, got {kind.name}")
    f = _array(value, _SIZES[kind], kind.name)
    sender = _bin(f[1], KEY_SIZE, "sender")
    sig = _bin(f[-1], SIGNATURE_SIZE, "signature")
    if kind is Kind.REQUEST:
        return Request(sender, _request(f[2], "request"), sig)
    if kind is Kind.PRE_PREPARE:
        view, seq = _uint(f[2], "view"), _uint(f[3], "seq")
        return PrePrepare(sender, view, seq, _bin(f[4], DIGEST_SIZE, "digest"), _batch(f[5]), sig)
    if kind is Kind.PREPARE or kind is Kind.COMMIT:
        cls = Prepare if kind is Kind.PREPARE else Commit
        return cls(sender, _uint(f[2], "view"), _uint(f[3], "seq"), _bin(f[4], DIGEST_SIZE, "digest"), sig)
    if kind is Kind.CHECKPOINT:
        return Checkpoint(sender, _uint(f[2], "seq"), _bin(f[3], DIGEST_SIZE, "state digest"), sig)
    if kind is Kind.VIEW_CHANGE:
        prepared = _list(f[6], MAX_LOG_WINDOW, "prepared set")
        return ViewChange(
            sender=sender,
            view=_uint(f[2], "view"),
            stable_seq=_uint(f[3], "stable seq"),
            state_digest=_bin(f[4], DIGEST_SIZE, "state digest"),
            checkpoint_cert=_sig_list(f[5], "checkpoint certificate"),
            prepared=tuple(_prepared(c, i) for i, c in enumerate(prepared)),
            signature=sig,
        )
    if kind is Kind.NEW_VIEW:
        vcs = _list(f[3], MAX_VALIDATORS, "view-change set")
        entries = []
        for i, item in enumerate(_list(f[4], MAX_LOG_WINDOW, "O set")):
            e = _array(item, 3, f"O entry {i}")
            entries.append(
                OEntry(_uint(e[0], "O seq"), _bin(e[1], DIGEST_SIZE, "O digest"), _bin(e[2], SIGNATURE_SIZE, "O sig"))
            )
        views = tuple(_parse(vc, nested=True) for vc in vcs)
        return NewView(sender, _uint(f[2], "view"), views, tuple(entries), sig)  # type: ignore[arg-type]
    if kind is Kind.STATUS:
        flag = _uint(f[3], "has_view")
        if flag > 1:
            raise ConsensusDecodeError(f"has_view must be 0 or 1, got {flag}")
        view, stable = _uint(f[2], "view"), _uint(f[4], "stable seq")
        return Status(sender, view, flag == 1, stable, _uint(f[5], "last executed"), sig)
    return Committed(sender, _batch(f[2]), _certificate(f[3]), sig)


def decode(data: bytes) -> Message:
    """Parse a signed message from untrusted bytes; any defect raises ConsensusDecodeError.
    The signature is not checked here (the replica does that, against its validator set)."""
    m = _parse(_unpack(data))
    if bytes(data) != _pack(_wire(m)):
        raise ConsensusDecodeError(f"{m.kind.name} is not in canonical form (a non-minimal msgpack encoding)")
    return m


def check_chain_id(chain_id: object) -> str:
    """The chain id a replica signs with: a str of 1..64 UTF-8 bytes."""
    if type(chain_id) is not str or not 1 <= len(chain_id.encode("utf-8")) <= MAX_CHAIN_ID_LEN:
        raise ConsensusDecodeError(f"chain id must be a str of 1..{MAX_CHAIN_ID_LEN} UTF-8 bytes, got {chain_id!r}")
    return chain_id

"""Durability records: what a replica asks its host to persist (synced) before it sends
the messages of the same step, and what ``Replica.restore`` rebuilds it from.

Six small records, each a canonical msgpack array ``[tag, ...]`` (protocols/pbft.md,
"Durability"). Signatures are never stored: Ed25519 is deterministic, so a restored replica
re-signs a vote and gets the very same bytes.

- ``ViewRecord(view, active)``: the replica entered ``view`` (``active=False``: it sent a
  VIEW-CHANGE for it; ``True``: it accepted or sent the NEW-VIEW). Never go back below it.
- ``VoteRecord(kind, view, seq, digest)``: it signed a PRE-PREPARE, PREPARE or COMMIT.
  A restored replica never signs another digest for the same (kind, view, seq).
- ``BatchRecord(seq, digest, batch)``: the batch it pre-prepared/accepted or saw committed,
  so it can execute it and resend it after a restart.
- ``PreparedRecord(cert)``: a prepared certificate; it goes into VIEW-CHANGE messages, and
  forgetting it could let a new view lose a committed batch.
- ``CommitRecord(cert)``: the batch at ``cert.seq`` committed (a committed block is never lost).
- ``StableRecord(seq, state_digest, sigs)``: a stable checkpoint with its certificate.

The host MAY drop records with ``prune_records`` (everything at or below the last stable
checkpoint, and votes of older views); the rest must be kept in order.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from .exceptions import ConsensusDecodeError, RecordError
from .messages import (
    DIGEST_SIZE,
    Batch,
    CommitCertificate,
    Kind,
    PreparedCert,
    Sig,
    _array,
    _batch,
    _bin,
    _certificate,
    _pack,
    _prepared,
    _sig_list,
    _uint,
    _unpack,
)


class RecordKind(enum.IntEnum):
    VIEW = 1
    VOTE = 2
    BATCH = 3
    PREPARED = 4
    COMMIT = 5
    STABLE = 6


@dataclass(frozen=True)
class ViewRecord:
    view: int
    active: bool


@dataclass(frozen=True)
class VoteRecord:
    kind: Kind  # PRE_PREPARE, PREPARE or COMMIT
    view: int
    seq: int
    digest: bytes


@dataclass(frozen=True)
class BatchRecord:
    seq: int
    digest: bytes
    batch: Batch


@dataclass(frozen=True)
class PreparedRecord:
    cert: PreparedCert


@dataclass(frozen=True)
class CommitRecord:
    cert: CommitCertificate


@dataclass(frozen=True)
class StableRecord:
    seq: int
    state_digest: bytes
    certificate: tuple[Sig, ...]


Record: TypeAlias = ViewRecord | VoteRecord | BatchRecord | PreparedRecord | CommitRecord | StableRecord
_VOTE_KINDS = (Kind.PRE_PREPARE, Kind.PREPARE, Kind.COMMIT)


def _array_of(r: Record) -> list[Any]:
    if isinstance(r, ViewRecord):
        return [RecordKind.VIEW.value, r.view, int(r.active)]
    if isinstance(r, VoteRecord):
        return [RecordKind.VOTE.value, r.kind.value, r.view, r.seq, r.digest]
    if isinstance(r, BatchRecord):
        return [RecordKind.BATCH.value, r.seq, r.digest, list(r.batch)]
    if isinstance(r, PreparedRecord):
        c = r.cert
        return [RecordKind.PREPARED.value, [c.view, c.seq, c.digest, c.pre_prepare_sig, [list(s) for s in c.prepares]]]
    if isinstance(r, CommitRecord):
        c2 = r.cert
        return [RecordKind.COMMIT.value, [c2.view, c2.seq, c2.digest, [list(s) for s in c2.commits]]]
    return [RecordKind.STABLE.value, r.seq, r.state_digest, [list(s) for s in r.certificate]]


def encode_record(r: Record) -> bytes:
    return _pack(_array_of(r))


def decode_record(data: bytes) -> Record:
    """Parse a stored record; a defect raises RecordError (storage is corrupt)."""
    try:
        r = _parse_record(_unpack(data))
    except ConsensusDecodeError as exc:
        raise RecordError(f"bad consensus record: {exc}") from None
    if encode_record(r) != bytes(data):
        raise RecordError("consensus record is not canonical")
    return r


def _parse_record(value: Any) -> Record:
    if type(value) is not list or not value or type(value[0]) is not int:
        raise ConsensusDecodeError("a record is an array starting with its tag")
    tag = value[0]
    if tag == RecordKind.VIEW:
        f = _array(value, 3, "view record")
        if _uint(f[2], "active") > 1:
            raise ConsensusDecodeError("active must be 0 or 1")
        return ViewRecord(_uint(f[1], "view"), f[2] == 1)
    if tag == RecordKind.VOTE:
        f = _array(value, 5, "vote record")
        kind = _uint(f[1], "vote kind")
        if kind not in _VOTE_KINDS:
            raise ConsensusDecodeError(f"vote kind {kind} is not a vote")
        return VoteRecord(Kind(kind), _uint(f[2], "view"), _uint(f[3], "seq"), _bin(f[4], DIGEST_SIZE, "digest"))
    if tag == RecordKind.BATCH:
        f = _array(value, 4, "batch record")
        return BatchRecord(_uint(f[1], "seq"), _bin(f[2], DIGEST_SIZE, "digest"), _batch(f[3]))
    if tag == RecordKind.PREPARED:
        return PreparedRecord(_prepared(_array(value, 2, "prepared record")[1], 0))
    if tag == RecordKind.COMMIT:
        return CommitRecord(_certificate(_array(value, 2, "commit record")[1]))
    if tag == RecordKind.STABLE:
        f = _array(value, 4, "stable record")
        return StableRecord(_uint(f[1], "seq"), _bin(f[2], DIGEST_SIZE, "state digest"), _sig_list(f[3], "certificate"))
    raise ConsensusDecodeError(f"unknown record tag {tag}")


def record_seq(r: Record) -> int | None:
    """The sequence number a record is about (None for a ViewRecord)."""
    if isinstance(r, ViewRecord):
        return None
    if isinstance(r, PreparedRecord | CommitRecord):
        return r.cert.seq
    return r.seq


def prune_records(records: Iterable[Record]) -> list[Record]:
    """The records a restart still needs: the last ViewRecord, the last StableRecord, and
    every record above that checkpoint (votes only for the last view). Order is kept."""
    items = list(records)
    stable = max((r.seq for r in items if isinstance(r, StableRecord)), default=0)
    views = [r for r in items if isinstance(r, ViewRecord)]
    last_view = max(views, key=lambda r: (r.view, r.active), default=None)
    last_stable = max((r for r in items if isinstance(r, StableRecord)), key=lambda r: r.seq, default=None)
    kept: list[Record] = []
    for r in items:
        if isinstance(r, ViewRecord):
            if r is last_view:
                kept.append(r)
        elif isinstance(r, StableRecord):
            if r is last_stable:
                kept.append(r)
        elif isinstance(r, VoteRecord) and last_view is not None and r.view < last_view.view:
            continue
        elif (record_seq(r) or 0) > stable:
            kept.append(r)
    return kept

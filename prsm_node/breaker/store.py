"""The breaker's LevelDB namespace: every counted vote and every model's record.

Keys (inside the ``breaker/`` namespace of prsm_node.store):

    b"v" + model (32) + voter (32) -> the voter's latest vote on the model (canonical bytes)
    b"m" + model (32)              -> the model's record (absent: RUNNING, nothing else)

A record is ``[state: uint, self_halted: 0|1, changed: [] | Transition, evidence: [vote bytes]]``
with ``Transition = [state, cause, vote: bin (empty: none), halt: amount16, resume: amount16,
total: amount16]`` plus ``height: uint`` as a seventh element when known. Each accepted vote is
written with its model's record in one synced batch, so a crash keeps both or neither. The
record is saved rather than recomputed on load because a model's state depends on the order
its votes came in (hysteresis).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..store import Namespace
from .exceptions import BreakerError, BreakerStoreError
from .params import BreakerParams
from .tally import Cause, ModelRecord, ModelState, Tally, Transition
from .votes import MAX_VOTE_SIZE, MODEL_ID_SIZE, VOTER_SIZE, Vote, decode_vote, encode_vote, pack, unpack

VOTE_PREFIX = b"v"
RECORD_PREFIX = b"m"
AMOUNT_SIZE = 16
MAX_EVIDENCE = 100_000
MAX_RECORD_SIZE = 2 * MAX_VOTE_SIZE + MAX_EVIDENCE * (MAX_VOTE_SIZE + 3) + 64


def vote_key(model: bytes, voter: bytes) -> bytes:
    return VOTE_PREFIX + model + voter


def record_key(model: bytes) -> bytes:
    return RECORD_PREFIX + model


# ------------------------------------------------------------ records


def _transition_fields(t: Transition) -> list[Any]:
    fields: list[Any] = [
        int(t.state),
        int(t.cause),
        b"" if t.vote is None else encode_vote(t.vote),
        t.halt_stake.to_bytes(AMOUNT_SIZE, "big"),
        t.resume_stake.to_bytes(AMOUNT_SIZE, "big"),
        t.total_stake.to_bytes(AMOUNT_SIZE, "big"),
    ]
    if t.height is not None:
        fields.append(t.height)
    return fields


def encode_record(r: ModelRecord) -> bytes:
    return pack(
        [
            int(r.state),
            int(r.self_halted),
            [] if r.changed is None else _transition_fields(r.changed),
            [encode_vote(v) for v in r.evidence],
        ]
    )


def _amount(value: Any) -> int:
    if type(value) is not bytes or len(value) != AMOUNT_SIZE:
        raise BreakerStoreError("a stake in a record must be bin of 16 bytes")
    return int.from_bytes(value, "big")


def _transition(f: Any) -> Transition | None:
    if f == []:
        return None
    if type(f) is not list or len(f) not in (6, 7) or type(f[2]) is not bytes:
        raise BreakerStoreError("a record's transition must be an array of 6 or 7")
    height = f[6] if len(f) == 7 else None
    if height is not None and type(height) is not int:
        raise BreakerStoreError("a transition's height must be an integer")
    return Transition(
        state=ModelState(f[0]),
        cause=Cause(f[1]),
        vote=decode_vote(f[2]) if f[2] else None,
        halt_stake=_amount(f[3]),
        resume_stake=_amount(f[4]),
        total_stake=_amount(f[5]),
        height=height,
    )


def decode_record(data: bytes) -> ModelRecord:
    """A stored record; any defect raises BreakerStoreError."""
    try:
        f = unpack(data, MAX_RECORD_SIZE, "breaker record")
        if type(f) is not list or len(f) != 4 or f[1] not in (0, 1) or type(f[1]) is not int:
            raise BreakerStoreError("a record must be [state, self_halted, changed, evidence]")
        if type(f[3]) is not list or any(type(v) is not bytes for v in f[3]):
            raise BreakerStoreError("a record's evidence must be an array of votes")
        record = ModelRecord(
            state=ModelState(f[0]),
            self_halted=bool(f[1]),
            changed=_transition(f[2]),
            evidence=tuple(decode_vote(v) for v in f[3]),
        )
        if encode_record(record) != bytes(data):
            raise BreakerStoreError("a record is not in canonical form")
    except (BreakerError, ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, BreakerStoreError):
            raise
        raise BreakerStoreError(f"breaker record does not decode: {exc}") from None
    return record


# ------------------------------------------------------------ the store


class BreakerStore:
    """Votes and model records in one Namespace (``store.namespace("breaker")``)."""

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns

    def save(self, tally: Tally, model: bytes, vote: Vote | None = None) -> None:
        """Persist ``vote`` (an accepted vote, replacing the voter's earlier one on that model)
        and ``model``'s record, in one synced batch."""
        self.save_models(tally, [model], votes=[] if vote is None else [vote])

    def save_models(self, tally: Tally, models: Iterable[bytes], *, votes: Iterable[Vote] = ()) -> None:
        """Persist the records of ``models`` (e.g. the changes of a recompute) and ``votes``,
        in one synced batch."""
        with self._ns.write_batch(sync=True) as batch:
            for vote in votes:
                batch.put(vote_key(vote.model, vote.voter), encode_vote(vote))
            for model in models:
                record = tally.record(model)
                if record == ModelRecord():
                    batch.delete(record_key(model))
                else:
                    batch.put(record_key(model), encode_record(record))

    def save_records(self, records: Mapping[bytes, ModelRecord], votes: Iterable[Vote] = ()) -> None:
        """Persist ``votes`` and a snapshot of model records (taken on the event loop while
        this runs in a worker thread), in one synced batch."""
        with self._ns.write_batch(sync=True) as batch:
            for vote in votes:
                batch.put(vote_key(vote.model, vote.voter), encode_vote(vote))
            for model, record in records.items():
                if record == ModelRecord():
                    batch.delete(record_key(model))
                else:
                    batch.put(record_key(model), encode_record(record))

    def load(self, params: BreakerParams, *, local_voter: bytes | None = None) -> Tally:
        """The tally as last saved (BreakerStoreError if a record does not decode)."""
        votes = []
        for key, value in self._ns.scan(VOTE_PREFIX):
            try:
                vote = decode_vote(value)
            except BreakerError as exc:
                raise BreakerStoreError(f"stored vote {key.hex()} does not decode: {exc}") from None
            if len(key) != 1 + MODEL_ID_SIZE + VOTER_SIZE or key != vote_key(vote.model, vote.voter):
                raise BreakerStoreError(f"stored vote {key.hex()} is under the wrong key")
            votes.append(vote)
        records = {}
        for key, value in self._ns.scan(RECORD_PREFIX):
            if len(key) != 1 + MODEL_ID_SIZE:
                raise BreakerStoreError(f"stored record {key.hex()} has a malformed key")
            records[key[1:]] = decode_record(value)
        return Tally.restore(params, votes, records, local_voter=local_voter)

"""The breaker tally: a pure, deterministic state machine per model (no sockets, no clocks).

Per model, each voter's latest vote (highest epoch) counts once, weighted by the voter's stake
in the stake table *passed to the call* — never the stake it had when it voted. Stake moves
with every block, so the service calls :meth:`Tally.recompute` with the new table after each
block; a model can halt or resume on a stake change alone.

With ``H``/``R`` the current stake of the halt/resume voters and ``T`` the total stake,
every evaluation does, in this order (exact integer arithmetic):

    if T > 0 and R >= resume_threshold * T:   state = RUNNING
    elif T > 0 and H >= halt_threshold * T:   state = HALTED
    else:                                     state unchanged (hysteresis)

so a halted model stays halted until a resume quorum (2/3 by default) lifts it, even when the
halt voters drop below 1/3, and a model where both quorums hold runs. For votes of distinct
voters, ``H`` and ``R`` only grow, so the final state does not depend on their arrival order.

The local node's own halt vote also "self-halts" the model on this node at once (it is not
counted network-wide any differently): the flag is lifted when the local voter votes resume
or when this node sees the model go HALTED -> RUNNING by a resume quorum.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol

from .exceptions import Replayed
from .params import BreakerParams
from .votes import Action, Vote

if TYPE_CHECKING:
    from ..ledger.state import LedgerState


class ModelState(enum.IntEnum):
    RUNNING = 1
    HALTED = 2


class Cause(enum.IntEnum):
    """What made a model change state."""

    VOTE = 1  # a vote crossed a threshold
    STAKE = 2  # a stake change (recompute) crossed it


class Stakes(Protocol):
    """The current stake table: what the ledger says after the last committed block."""

    def stake_of(self, account: bytes) -> int: ...

    def total_stake(self) -> int: ...


class StakeTable:
    """A stake table from a mapping ``{account: stake}`` (total: the sum unless given)."""

    def __init__(self, stakes: Mapping[bytes, int], total: int | None = None) -> None:
        self._stakes = {k: v for k, v in stakes.items() if v > 0}
        self._total = sum(self._stakes.values()) if total is None else total

    @classmethod
    def from_ledger(cls, state: LedgerState) -> StakeTable:
        return cls(state.stakes())

    def stake_of(self, account: bytes) -> int:
        return self._stakes.get(account, 0)

    def total_stake(self) -> int:
        return self._total

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StakeTable):
            return NotImplemented
        return self._total == other._total and self._stakes == other._stakes


@dataclass(frozen=True)
class Transition:
    """A state change of one model: the state entered, why, and the stake at that moment.

    ``vote`` is the vote that crossed the threshold (None for a stake change; ``height`` is
    then the block height the service passed to recompute, if any).
    """

    state: ModelState
    cause: Cause
    vote: Vote | None
    halt_stake: int
    resume_stake: int
    total_stake: int
    height: int | None = None


@dataclass(frozen=True)
class ModelRecord:
    """What a model's state is beyond its votes (persisted as is; it depends on history).

    ``evidence``: while HALTED, the halt votes that counted when the model halted (even if
    superseded since); catch-up serves them so that a node which missed them halts too.
    """

    state: ModelState = ModelState.RUNNING
    self_halted: bool = False
    changed: Transition | None = None
    evidence: tuple[Vote, ...] = ()


@dataclass(frozen=True)
class VoterStatus:
    voter: bytes
    action: Action
    reason: str
    epoch: int
    timestamp_ms: int
    stake: int  # current stake: the weight this vote has now


@dataclass(frozen=True)
class ModelStatus:
    model: bytes
    state: ModelState  # network-wide
    self_halted: bool
    halted: bool  # network-wide HALTED or self-halted: what enforcement obeys
    halt_stake: int
    resume_stake: int
    total_stake: int
    voters: tuple[VoterStatus, ...]  # in voter key order
    changed: Transition | None


@dataclass(frozen=True)
class Added:
    """What :meth:`Tally.add` did: the vote it replaced and the state change it caused."""

    vote: Vote
    superseded: Vote | None
    transition: Transition | None
    self_halted: bool  # the model's self-halt flag after the vote


_DEFAULT = ModelRecord()


def _reaches(stake: int, threshold: Fraction, total: int) -> bool:
    """``stake >= threshold * total`` in exact integers; nothing is reached with no stake at all."""
    return total > 0 and stake * threshold.denominator >= threshold.numerator * total


class Tally:
    def __init__(self, params: BreakerParams, *, local_voter: bytes | None = None) -> None:
        self.params = params
        self.local_voter = local_voter
        self._votes: dict[bytes, dict[bytes, Vote]] = {}  # model -> voter -> latest vote
        self._records: dict[bytes, ModelRecord] = {}
        self._count = 0  # sum of len(by_voter): waits on it run after every vote counted

    @classmethod
    def restore(
        cls,
        params: BreakerParams,
        votes: Iterable[Vote],
        records: Mapping[bytes, ModelRecord],
        *,
        local_voter: bytes | None = None,
    ) -> Tally:
        """A tally exactly as saved: votes and records are taken as they are, not re-evaluated
        (the state depends on history); call :meth:`recompute` with the current stakes next."""
        tally = cls(params, local_voter=local_voter)
        for vote in votes:
            current = tally._votes.setdefault(vote.model, {}).get(vote.voter)
            if current is None or vote.epoch > current.epoch:
                tally._votes[vote.model][vote.voter] = vote
                tally._count += current is None
        tally._records.update((m, r) for m, r in records.items() if r != _DEFAULT)
        return tally

    # ------------------------------------------------------------ queries

    def models(self) -> list[bytes]:
        """Every model with a vote or a record, in key order."""
        return sorted(self._votes.keys() | self._records.keys())

    def record(self, model: bytes) -> ModelRecord:
        return self._records.get(model, _DEFAULT)

    def state(self, model: bytes) -> ModelState:
        """The network-wide state (RUNNING for a model nobody voted on)."""
        return self.record(model).state

    def is_halted(self, model: bytes) -> bool:
        """What enforcement obeys: halted network-wide, or self-halted by this node's vote."""
        r = self.record(model)
        return r.state is ModelState.HALTED or r.self_halted

    def halted_models(self) -> list[bytes]:
        return [m for m in self.models() if self.is_halted(m)]

    def last_epoch(self, voter: bytes, model: bytes) -> int | None:
        """The epoch of ``voter``'s counted vote on ``model`` (for check_vote's last_epoch_of)."""
        vote = self._votes.get(model, {}).get(voter)
        return None if vote is None else vote.epoch

    def vote_count(self) -> int:
        """How many votes :meth:`votes` yields (the latest of each voter on each model)."""
        return self._count

    def votes(self, model: bytes | None = None) -> Iterator[Vote]:
        """The latest vote of every voter, by (model, voter) key order."""
        for m in [model] if model is not None else sorted(self._votes):
            by_voter = self._votes.get(m, {})
            for voter in sorted(by_voter):
                yield by_voter[voter]

    def catchup_votes(self, model: bytes | None = None) -> list[Vote]:
        """What a GET_VOTES responder serves: the latest votes plus the evidence of halted
        models (superseded halt votes included), each once."""
        out = list(self.votes(model))
        seen = {(v.model, v.voter, v.epoch) for v in out}
        for m in [model] if model is not None else self.models():
            for v in self.record(m).evidence:
                if (v.model, v.voter, v.epoch) not in seen:
                    seen.add((v.model, v.voter, v.epoch))
                    out.append(v)
        return out

    def weights(self, model: bytes, stakes: Stakes) -> tuple[int, int, int]:
        """``(halt_stake, resume_stake, total_stake)`` of ``model`` under ``stakes``."""
        halt = resume = 0
        for voter, vote in self._votes.get(model, {}).items():
            if vote.action is Action.HALT:
                halt += stakes.stake_of(voter)
            else:
                resume += stakes.stake_of(voter)
        return halt, resume, stakes.total_stake()

    def status(self, model: bytes, stakes: Stakes) -> ModelStatus:
        halt, resume, total = self.weights(model, stakes)
        r = self.record(model)
        voters = tuple(
            VoterStatus(v.voter, v.action, v.reason, v.epoch, v.timestamp_ms, stakes.stake_of(v.voter))
            for v in self.votes(model)
        )
        return ModelStatus(
            model=model,
            state=r.state,
            self_halted=r.self_halted,
            halted=r.state is ModelState.HALTED or r.self_halted,
            halt_stake=halt,
            resume_stake=resume,
            total_stake=total,
            voters=voters,
            changed=r.changed,
        )

    # ------------------------------------------------------------ transitions

    def add(self, vote: Vote, stakes: Stakes) -> Added:
        """Count ``vote`` (which passed check_vote) and re-evaluate its model.

        A vote whose epoch is not above the voter's counted one raises Replayed and changes
        nothing; otherwise it replaces the voter's earlier vote on that model.
        """
        by_voter = self._votes.setdefault(vote.model, {})
        previous = by_voter.get(vote.voter)
        if previous is not None and vote.epoch <= previous.epoch:
            raise Replayed(vote.voter, vote.model, previous.epoch, vote.epoch)
        by_voter[vote.voter] = vote
        self._count += previous is None
        if self.local_voter is not None and vote.voter == self.local_voter:
            r = self.record(vote.model)
            self._set(vote.model, ModelRecord(r.state, vote.action is Action.HALT, r.changed, r.evidence))
        transition = self._evaluate(vote.model, stakes, Cause.VOTE, vote, None)
        return Added(vote, previous, transition, self.record(vote.model).self_halted)

    def recompute(self, stakes: Stakes, *, height: int | None = None) -> list[tuple[bytes, Transition]]:
        """Re-evaluate every model against a new stake table (after each block)."""
        changes = []
        for model in self.models():
            transition = self._evaluate(model, stakes, Cause.STAKE, None, height)
            if transition is not None:
                changes.append((model, transition))
        return changes

    def _evaluate(
        self, model: bytes, stakes: Stakes, cause: Cause, vote: Vote | None, height: int | None
    ) -> Transition | None:
        halt, resume, total = self.weights(model, stakes)
        r = self.record(model)
        target = r.state
        if _reaches(resume, self.params.resume_threshold, total):
            target = ModelState.RUNNING
        elif _reaches(halt, self.params.halt_threshold, total):
            target = ModelState.HALTED
        if target is r.state:
            return None
        transition = Transition(target, cause, vote, halt, resume, total, height)
        if target is ModelState.HALTED:
            evidence = tuple(v for v in self.votes(model) if v.action is Action.HALT and stakes.stake_of(v.voter) > 0)
            self._set(model, ModelRecord(target, r.self_halted, transition, evidence))
        else:  # a resume quorum: lifts this node's self-halt too
            self._set(model, ModelRecord(target, False, transition, ()))
        return transition

    def _set(self, model: bytes, record: ModelRecord) -> None:
        if record == _DEFAULT:
            self._records.pop(model, None)
        else:
            self._records[model] = record

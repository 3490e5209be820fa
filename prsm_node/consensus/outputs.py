"""What one replica step hands back to its host (see "How to drive this replica" in replica.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Batch, CommitCertificate, Sig
from .records import Record


@dataclass(frozen=True)
class Outgoing:
    """Encoded bytes to send to validator ``to`` (a key), or to every other validator when
    ``to`` is None."""

    to: bytes | None
    data: bytes


@dataclass(frozen=True)
class CommittedBatch:
    """The batch at ``seq`` committed; delivered in seq order, once. Execute it, then call
    ``Replica.executed(seq, state_digest)``. ``certificate`` lets anyone verify it later."""

    seq: int
    batch: Batch
    certificate: CommitCertificate


@dataclass(frozen=True)
class Evidence:
    """Two conflicting messages signed by ``sender`` (for the same view/seq and phase, or two
    checkpoints for one seq): both encoded, each verifiable on its own."""

    sender: bytes
    first: bytes
    second: bytes


@dataclass(frozen=True)
class FetchState:
    """This replica lags behind a stable checkpoint: fetch the state (and the blocks) up to
    ``seq`` whose state digest is ``state_digest``, proven by ``certificate`` (a quorum of
    CHECKPOINT signatures), then call ``Replica.state_transferred(seq, state_digest)``.
    A later FetchState supersedes an earlier one."""

    seq: int
    state_digest: bytes
    certificate: tuple[Sig, ...]


@dataclass
class Step:
    """The outputs of one call, to handle in this order: persist ``records`` (synced), then
    send ``messages``, then execute ``committed`` in order, report ``evidence``, start
    ``fetch_state``, and pass ``requests`` (forwarded by peers) to the mempool."""

    records: list[Record] = field(default_factory=list)
    messages: list[Outgoing] = field(default_factory=list)
    committed: list[CommittedBatch] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    fetch_state: FetchState | None = None
    requests: list[bytes] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        """Append ``other`` (a later step) to this one, keeping the handling order valid."""
        self.records.extend(other.records)
        self.messages.extend(other.messages)
        self.committed.extend(other.committed)
        self.evidence.extend(other.evidence)
        self.fetch_state = other.fetch_state or self.fetch_state
        self.requests.extend(other.requests)

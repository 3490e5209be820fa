"""One sequence number's messages in the current view, and quorum counting over them.

A sender counts once per (view, seq, phase): ``prepares`` and ``commits`` are keyed by
sender and keep the first message; a second one with another digest is evidence, never a
second vote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Commit, Prepare, PrePrepare


@dataclass
class Slot:
    view: int
    pre_prepare: PrePrepare | None = None  # its batch is () when not (yet) known
    rejected: bool = False  # validate_batch refused the pre-prepared batch
    prepares: dict[bytes, Prepare] = field(default_factory=dict)
    commits: dict[bytes, Commit] = field(default_factory=dict)
    prepared: bool = False
    committed: bool = False

    def matching_prepares(self, digest: bytes) -> list[Prepare]:
        return [p for p in self.prepares.values() if p.digest == digest]

    def commit_quorum(self, quorum: int) -> tuple[bytes, list[Commit]] | None:
        """The digest that a quorum of distinct senders committed, with their messages."""
        by_digest: dict[bytes, list[Commit]] = {}
        for c in self.commits.values():
            by_digest.setdefault(c.digest, []).append(c)
        for digest, group in by_digest.items():
            if len(group) >= quorum:
                return digest, group
        return None

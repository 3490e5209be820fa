"""The replica's durability records in LevelDB (namespace ``pbft/``), in the order it asked
for them: key = an 8-byte big-endian counter, value = ``encode_record``.

``append`` writes one step's records in one synced batch, before that step's messages leave
(a restart must never let this validator sign two different votes). After a new stable
checkpoint ``prune`` keeps only what ``Replica.restore`` still needs.

:class:`EvidenceStore` keeps equivocation evidence (both signed messages) beside them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..store import Namespace
from .records import Record, StableRecord, decode_record, encode_record, prune_records

_KEY_SIZE = 8


class RecordStore:
    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self._next = 0
        self.appended = 0

    def load(self) -> list[Record]:
        """Every stored record, in order (RecordError when one is corrupt)."""
        records = []
        last = -1
        for key, value in self._ns.items():
            records.append(decode_record(value))
            last = int.from_bytes(key, "big")
        self._next = last + 1
        return records

    def append(self, records: Sequence[Record]) -> bool:
        """Persist ``records`` (synced); True when one is a new stable checkpoint."""
        with self._ns.write_batch(sync=True) as batch:
            for r in records:
                batch.put(self._next.to_bytes(_KEY_SIZE, "big"), encode_record(r))
                self._next += 1
        self.appended += len(records)
        return any(isinstance(r, StableRecord) for r in records)

    def prune(self) -> int:
        """Drop what a restart no longer needs; returns how many records are kept."""
        kept = prune_records(self.load())
        items = {i.to_bytes(_KEY_SIZE, "big"): encode_record(r) for i, r in enumerate(kept)}
        self._ns.replace_all(items, sync=True)
        self._next = len(kept)
        return len(kept)


class EvidenceStore:
    """Equivocation evidence in LevelDB (namespace ``pbft-evidence/``): key = the sender's
    32-byte key + sha256 of both messages, value = 4-byte big-endian length of the first
    signed message, the first, then the second. ``counts`` holds how many per sender."""

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self.counts: dict[bytes, int] = {}

    def load(self) -> dict[bytes, int]:
        counts: dict[bytes, int] = {}
        for key, _ in self._ns.items():
            counts[key[:32]] = counts.get(key[:32], 0) + 1
        self.counts = counts
        return counts

    def add(self, sender: bytes, first: bytes, second: bytes) -> bool:
        """Keep one piece of evidence (synced); False when it was already stored."""
        key = sender + hashlib.sha256(first + second).digest()
        if self._ns.get(key) is not None:
            return False
        self._ns.put(key, len(first).to_bytes(4, "big") + first + second, sync=True)
        self.counts[sender] = self.counts.get(sender, 0) + 1
        return True

    def items(self) -> list[tuple[bytes, bytes, bytes]]:
        """Every stored (sender, first, second)."""
        out = []
        for key, value in self._ns.items():
            n = int.from_bytes(value[:4], "big")
            out.append((key[:32], value[4 : 4 + n], value[4 + n :]))
        return out

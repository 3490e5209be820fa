"""Test faults (``prsm-node start --test-fault ...``): make this validator misbehave on
purpose, to check that the others keep making progress. Never on unless asked for; the node
logs loudly that it runs one.

- ``silent``: sends no PBFT message at all (it still receives and executes).
- ``bad-signatures``: every PBFT message it sends carries a corrupted signature.
- ``equivocate``: PRE-PREPAREs, PREPAREs and COMMITs go as signed to half of the validators
  and, to the other half, signed for another batch (another digest) of the same view and seq.
"""

from __future__ import annotations

import dataclasses
import hashlib

from .blocks import BadBatch, decode_meta, encode_meta
from .messages import Commit, Prepare, PrePrepare, Signer, batch_digest, decode, encode, signing_payload
from .outputs import Outgoing

TEST_FAULTS = ("equivocate", "bad-signatures", "silent")


class Fault:
    def __init__(self, name: str, signer: Signer, chain_id: str, peers: list[bytes]) -> None:
        if name not in TEST_FAULTS:
            raise ValueError(f"unknown test fault {name!r}; one of {', '.join(TEST_FAULTS)}")
        self.name = name
        self._signer = signer
        self._chain_id = chain_id
        self._peers = sorted(peers)

    def apply(self, out: Outgoing) -> list[Outgoing]:
        """What really goes out instead of ``out``."""
        if self.name == "silent":
            return []
        if self.name == "bad-signatures":
            data = out.data
            return [Outgoing(out.to, data[:-1] + bytes([data[-1] ^ 0x01]))]
        return self._equivocate(out)

    def _equivocate(self, out: Outgoing) -> list[Outgoing]:
        m = decode(out.data)
        if not isinstance(m, PrePrepare | Prepare | Commit) or m.sender != self._signer.public_key:
            return [out]
        if isinstance(m, PrePrepare):
            batch = m.batch
            try:
                proposer, time_ms = decode_meta(batch[0]) if batch else (m.sender, 0)
            except BadBatch:
                proposer, time_ms = m.sender, 0
            other_batch = (encode_meta(proposer, time_ms + 1), *batch[1:])
            other: PrePrepare | Prepare | Commit = dataclasses.replace(
                m, digest=batch_digest(self._chain_id, other_batch), batch=other_batch
            )
        else:
            other = dataclasses.replace(m, digest=hashlib.sha256(b"equivocate" + m.digest).digest())
        other = dataclasses.replace(other, signature=self._signer.sign(signing_payload(other, self._chain_id)))
        targets = self._peers if out.to is None else [out.to]
        half = len(targets) // 2
        honest = [Outgoing(t, out.data) for t in targets[:half]]
        lying = [Outgoing(t, encode(other)) for t in targets[half:]]
        return honest + lying

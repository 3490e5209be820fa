"""Signature checks in bulk, for a worker thread or a worker process.

Importable without trio or libp2p (a verifier process imports only this, nacl and msgpack).
A check is a ``(public_key, message, signature)`` triple: a tx has one for its sender and,
when it settles receipts, one per receipt payer; a BreakerVote adds its voter's.
"""

from __future__ import annotations

from ..breaker.votes import signing_payload as vote_signing_payload
from .codec import receipt_signing_payload, signing_payload
from .signing import _verify
from .types import BreakerVote, Settle, Tx

Triple = tuple[bytes, bytes, bytes]


def triples_of(tx: Tx) -> list[Triple]:
    out = [(tx.sender, signing_payload(tx), tx.signature)]
    if isinstance(tx.body, Settle):
        out.extend((r.payer, receipt_signing_payload(r), r.signature) for r in tx.body.receipts)
    elif isinstance(tx.body, BreakerVote):
        v = tx.body.vote
        out.append((v.voter, vote_signing_payload(v), v.signature))
    return out


def verify_triples(triples: list[Triple]) -> list[bool]:
    return [_verify(pk, message, sig) for pk, message, sig in triples]

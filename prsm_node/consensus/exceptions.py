"""Errors of the PBFT core. Every one derives from ConsensusError.

``InvalidMessage`` and its subclasses mean "this input from a peer was rejected and the
replica is exactly as before": the service drops it and penalises the peer that sent it.
``HostError`` means the host called the replica wrongly (its bug, not a peer's).
"""

from __future__ import annotations

from ..exceptions import PrsmError


class ConsensusError(PrsmError):
    """Root of every error raised on purpose by prsm_node.consensus."""


class ConfigurationError(ConsensusError):
    """Raised when PBFT parameters or the validator set cannot run a replica (L not a
    multiple of K, fewer than 4 or duplicate validators, a timeout that is not positive, ...)."""


# ------------------------------------------------------------ rejected peer input


class InvalidMessage(ConsensusError):
    """Raised when a message from a peer is rejected; the replica state is unchanged."""


class ConsensusDecodeError(InvalidMessage):
    """Raised when bytes are not a valid canonical PBFT message or record: malformed msgpack,
    a wrong field type or length, an unknown kind, a non-minimal form, or over a size limit."""


class UnknownSender(InvalidMessage):
    """Raised when a message (or a signature inside a certificate) names a key that is not
    one of the validators."""


class BadSignature(InvalidMessage):
    """Raised when a message signature, or a signature inside a certificate, does not verify."""


class InvalidCertificate(InvalidMessage):
    """Raised when a certificate (checkpoint, prepared, commit) has too few distinct valid
    signers, a signer twice, or a signer that may not sign it (the primary preparing)."""


class InvalidViewChange(InvalidMessage):
    """Raised when a VIEW-CHANGE is malformed: a prepared certificate outside its window or
    not below the new view, sequence numbers not strictly ascending, a bad checkpoint."""


class InvalidNewView(InvalidMessage):
    """Raised when a NEW-VIEW is not from the new view's primary, carries fewer than a quorum
    of valid VIEW-CHANGE messages for its view, or its O set differs from the one every
    replica re-derives from those messages."""


class InvalidBatch(InvalidMessage):
    """Raised when a PRE-PREPARE or COMMITTED batch does not match its digest, repeats a
    request, or is over the batch limits."""


class NotPrimary(InvalidMessage):
    """Raised when a PRE-PREPARE or NEW-VIEW comes from a validator that is not the primary
    of its view."""


# ------------------------------------------------------------ host misuse


class HostError(ConsensusError):
    """Raised when the host calls the replica out of turn: ``executed`` for a sequence number
    that is not the next delivered one, ``propose`` while not primary or with a full window,
    an oversized batch or request, or records that do not form a valid log."""


class ProposalRefused(HostError):
    """Raised by ``propose`` when this replica may not propose now (not the primary, view
    change in progress, watermark window full) or the batch is over the limits."""


class RecordError(HostError):
    """Raised when persisted records cannot be decoded or contradict each other on restore."""

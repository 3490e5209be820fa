"""The validator set, quorum sizes and the checks of signatures and certificates.

With ``n`` validators PBFT tolerates ``f = (n - 1) // 3`` Byzantine ones. A quorum is
``ceil((n + f + 1) / 2)`` validators, which is ``2f + 1`` when ``n = 3f + 1`` (for other ``n``
two quorums still share at least ``f + 1`` validators, i.e. one honest one). A prepared
certificate holds the primary's PRE-PREPARE and ``quorum - 1`` PREPAREs of other validators.

Every check raises an InvalidMessage subclass: a caller that gets bytes from a peer rejects
the whole message when any part of it is wrong. ``ValidatorSet.verify`` is injected so that a
simulation can cache verification results (Ed25519 verify costs ~100 us).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .exceptions import BadSignature, ConfigurationError, InvalidCertificate, UnknownSender
from .messages import (
    DIGEST_SIZE,
    KEY_SIZE,
    MAX_VALIDATORS,
    Checkpoint,
    Commit,
    CommitCertificate,
    Message,
    Prepare,
    PreparedCert,
    PrePrepare,
    Sig,
    Verify,
    check_chain_id,
    signing_payload,
    verify_signature,
)

GENESIS_STATE_DIGEST = bytes(DIGEST_SIZE)
"""The state digest of the implicit checkpoint at seq 0 (no certificate needed)."""


@dataclass(frozen=True)
class ValidatorSet:
    """The ordered validators of one chain; ``primary(view) = validators[view % n]``."""

    chain_id: str
    validators: tuple[bytes, ...]
    verify: Verify = field(default=verify_signature, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_chain_id(self.chain_id)
        n = len(self.validators)
        if not 4 <= n <= MAX_VALIDATORS:
            raise ConfigurationError(f"PBFT needs 4..{MAX_VALIDATORS} validators, got {n}")
        if any(type(v) is not bytes or len(v) != KEY_SIZE for v in self.validators):
            raise ConfigurationError("every validator must be a 32-byte Ed25519 public key")
        if len(set(self.validators)) != n:
            raise ConfigurationError("the validator set holds a key twice")
        object.__setattr__(self, "_index", {v: i for i, v in enumerate(self.validators)})

    @property
    def n(self) -> int:
        return len(self.validators)

    @property
    def f(self) -> int:
        return (self.n - 1) // 3

    @property
    def quorum(self) -> int:
        return (self.n + self.f + 2) // 2

    @property
    def weak(self) -> int:
        """f + 1: enough to contain one honest validator."""
        return self.f + 1

    def index(self, key: bytes) -> int:
        idx: dict[bytes, int] = self._index  # type: ignore[attr-defined]
        try:
            return idx[key]
        except KeyError:
            raise UnknownSender(f"{key.hex()[:16]}… is not a validator") from None

    def is_validator(self, key: bytes) -> bool:
        return key in self._index  # type: ignore[attr-defined]

    def primary(self, view: int) -> bytes:
        return self.validators[view % self.n]

    # -------------------------------------------------------- signatures

    def check(self, m: Message) -> None:
        """The sender is a validator and the signature verifies (else an InvalidMessage)."""
        self.index(m.sender)
        if not self.verify(m.sender, signing_payload(m, self.chain_id), m.signature):
            raise BadSignature(f"bad {m.kind.name} signature from {m.sender.hex()[:16]}…")

    def _signers(self, sigs: Sequence[Sig], build: Callable[[bytes, bytes], Message], what: str) -> set[bytes]:
        """Check each ``(key, sig)`` as the message ``build(key, sig)``; keys must be distinct."""
        seen: set[bytes] = set()
        for key, sig in sigs:
            if key in seen:
                raise InvalidCertificate(f"{what}: {key.hex()[:16]}… signs twice")
            seen.add(key)
            self.check(build(key, sig))
        return seen

    def check_checkpoint_cert(self, seq: int, state_digest: bytes, sigs: Sequence[Sig]) -> None:
        """A quorum of CHECKPOINT signatures over ``(seq, state_digest)``; at seq 0 the genesis
        checkpoint, which needs none."""
        if seq == 0:
            if state_digest != GENESIS_STATE_DIGEST or sigs:
                raise InvalidCertificate("the seq-0 checkpoint has the zero digest and no signatures")
            return
        self._need(sigs, self.quorum, "checkpoint certificate")
        self._signers(sigs, lambda k, s: Checkpoint(k, seq, state_digest, s), "checkpoint certificate")

    def check_prepared_cert(self, c: PreparedCert) -> None:
        """The primary of ``c.view`` pre-prepared and ``quorum - 1`` others prepared it."""
        primary = self.primary(c.view)
        self.check(PrePrepare(primary, c.view, c.seq, c.digest, (), c.pre_prepare_sig))
        self._need(c.prepares, self.quorum - 1, "prepared certificate")
        signers = self._signers(c.prepares, lambda k, s: Prepare(k, c.view, c.seq, c.digest, s), "prepared certificate")
        if primary in signers:
            raise InvalidCertificate("the primary's PREPARE does not count in a prepared certificate")

    def check_commit_cert(self, c: CommitCertificate) -> None:
        """A quorum of COMMIT signatures over ``(view, seq, digest)``."""
        self._need(c.commits, self.quorum, "commit certificate")
        self._signers(c.commits, lambda k, s: Commit(k, c.view, c.seq, c.digest, s), "commit certificate")

    def _need(self, sigs: Sequence[Sig], count: int, what: str) -> None:
        if len(sigs) < count:
            raise InvalidCertificate(f"{what} has {len(sigs)} signatures, needs {count}")


def sorted_sigs(sigs: Iterable[Sig]) -> tuple[Sig, ...]:
    """Certificates list their signers in ascending key order (a canonical choice)."""
    return tuple(sorted(sigs))


def verify_commit_certificate(validators: ValidatorSet, cert: CommitCertificate, digest: bytes) -> None:
    """For non-validator nodes: raise unless ``cert`` commits ``digest`` (a batch digest)."""
    if cert.digest != digest:
        raise InvalidCertificate("the certificate commits another batch")
    validators.check_commit_cert(cert)

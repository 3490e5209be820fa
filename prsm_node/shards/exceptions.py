"""Errors of the shard core. Every one derives from ShardError.

``ShardDecodeError`` means bytes from outside (a manifest or a ``/prsm/shard/1.0.0`` message)
are not a valid canonical encoding: penalise the peer that sent them. ``InvalidManifest`` is
a manifest object that breaks a rule (built locally, or decoded and then checked);
``BadManifestSignature`` one whose publisher signature does not verify. The store's errors
say which chunk, manifest or file is at fault; ``QuotaExceeded`` leaves the store unchanged.
"""

from __future__ import annotations

from ..exceptions import PrsmError


class ShardError(PrsmError):
    """Root of every error raised on purpose by prsm_node.shards."""


# ------------------------------------------------------------ bytes and manifests


class ShardDecodeError(ShardError):
    """Raised when bytes are not a valid canonical encoding of a manifest or a shard message:
    malformed msgpack, a wrong field type or length, a broken manifest rule, trailing bytes,
    a non-minimal form, or over a size limit."""


class UnknownMessageType(ShardDecodeError):
    """Raised when a shard message carries a type id this version does not know, or a
    response type where a request was expected."""


class InvalidManifest(ShardError):
    """Raised when a manifest object breaks a rule: a field of the wrong type or size, a bad
    path, a tensor table that does not tile its file, a chunk list that does not match the
    file size, a total that is not the sum of the files, or a limit exceeded."""


class TensorTableMismatch(InvalidManifest):
    """Raised when a file's actual safetensors header disagrees with the manifest's tensor
    table for that file (the publisher signed a table that does not describe the bytes)."""


class BadManifestSignature(ShardError):
    """Raised when a manifest's signature is not the publisher's Ed25519 signature over its
    signing payload."""


class InvalidSafetensors(ShardError):
    """Raised when a file is not a safetensors file we accept: a header length out of range,
    a header that is not a strict JSON object, an unknown dtype, a tensor whose shape does
    not match its byte length, or tensor data that overlaps, leaves holes or runs past the end."""


# ------------------------------------------------------------ the chunk store


class ChunkHashMismatch(ShardError):
    """Raised when bytes offered for a chunk (or read from a file being imported) do not hash
    to the chunk's SHA-256; nothing is stored."""


class CorruptChunk(ShardError):
    """Raised when a stored chunk file no longer hashes to its name on a verified read; the
    file is deleted, so the chunk counts as missing and is fetched again."""


class ChunkNotFound(ShardError):
    """Raised when a chunk is asked for that the store does not hold."""


class InvalidRange(ShardError):
    """Raised when ``read_range`` asks for bytes outside the chunk (negative, or past its end)."""


class ManifestNotFound(ShardError):
    """Raised when a manifest id is asked for that the store does not hold."""


class MissingChunks(ShardError):
    """Raised when a model cannot be assembled because some of its chunks are not stored."""

    def __init__(self, manifest_id: bytes, missing: list[int]) -> None:
        super().__init__(f"manifest {manifest_id.hex()}: {len(missing)} chunks missing (first: {missing[:8]})")
        self.manifest_id = manifest_id
        self.missing = missing


class FileHashMismatch(ShardError):
    """Raised when an assembled file's SHA-256 differs from the manifest's whole-file hash
    (every chunk verified, so the manifest itself is inconsistent); nothing is written."""


class UnsafePath(ShardError):
    """Raised when assembling would write outside the destination folder (a symlink on the way)."""


class QuotaExceeded(ShardError):
    """Raised when storing would take the store over its quota; nothing is stored."""

    def __init__(self, needed: int, usage: int, quota: int) -> None:
        super().__init__(f"storing {needed} bytes would exceed the quota: {usage} of {quota} bytes in use")
        self.needed = needed
        self.usage = usage
        self.quota = quota

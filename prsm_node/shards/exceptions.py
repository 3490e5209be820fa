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
    to the chunk's SHA-256, or have the wrong length; nothing is written."""


class CorruptChunk(ShardError):
    """Raised when a verified chunk, read back from its model file, no longer hashes to the
    manifest (the file was changed or damaged on disk, or is gone); the chunk leaves the
    verified-chunk record, so it counts as missing and a fetch writes it again."""


class ChunkNotFound(ShardError):
    """Raised when a chunk is asked for that is not verified here."""


class ModelBusy(ShardError):
    """Raised when a model's files are being written (a fetch or publish of it is running)
    and another writer, or a removal, is asked for."""


class ManifestNotFound(ShardError):
    """Raised when a manifest id is asked for that the store does not hold."""


class MissingChunks(ShardError):
    """Raised when a model cannot be finished because some of its chunks are not verified here
    (``missing`` lists them; chunks found corrupt while finishing are among them)."""

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
    """Raised when storing a manifest or reserving a model's files would take the store over
    its quota; nothing is stored."""

    def __init__(self, needed: int, usage: int, quota: int) -> None:
        super().__init__(f"storing {needed} bytes would exceed the quota: {usage} of {quota} bytes in use")
        self.needed = needed
        self.usage = usage
        self.quota = quota

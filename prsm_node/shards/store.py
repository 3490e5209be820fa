"""The content-addressed chunk and manifest store of one node (``<home>/data``).

    <root>/chunks/ab/cd/abcd…(64 hex)   one file per chunk, named by its SHA-256
    <root>/manifests/<64 hex id>        canonical manifest bytes, named by the manifest id
    <root>/tmp/                         files being written (emptied when the store opens)

Every write goes to ``tmp/``, is fsynced, then renamed into place, so a crash leaves either the
whole verified file or nothing (a lost rename only means the chunk is fetched again). A chunk
is hashed before it is stored, never after; a verified read re-hashes it and deletes a file
that no longer matches, so it counts as missing again. Which chunks of a model are present is
derived from the chunk files alone: a fetch that resumes after a restart asks ``missing()``
and never downloads a chunk it already holds.

A stored manifest pins its chunks: ``remove()`` deletes a manifest and the chunks no other
stored manifest references. Store the manifest before fetching its chunks.

All methods block on file I/O: the service calls them through ``trio.to_thread.run_sync``.
They are safe to call from several threads at once (one process per store: node.lock).
Usage counts the bytes of chunk and manifest files (their sizes, not disk blocks).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .exceptions import (
    ChunkHashMismatch,
    ChunkNotFound,
    CorruptChunk,
    FileHashMismatch,
    InvalidRange,
    InvalidSafetensors,
    ManifestNotFound,
    MissingChunks,
    QuotaExceeded,
    ShardDecodeError,
    TensorTableMismatch,
    UnsafePath,
)
from .header import read_header
from .manifest import HASH_SIZE, MAX_CHUNK_SIZE, Manifest, decode_manifest, encode_manifest, verify_manifest

READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class StoreStatistics:
    chunks: int
    manifests: int
    usage: int
    quota: int | None


class ShardStore:
    """Chunks and manifests under ``root``; ``quota`` (bytes) bounds what may be stored."""

    def __init__(self, root: Path, *, quota: int | None = None) -> None:
        if quota is not None and quota < 0:
            raise ValueError("quota must be non-negative")
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.manifests_dir = self.root / "manifests"
        self.tmp_dir = self.root / "tmp"
        self.quota = quota
        for d in (self.chunks_dir, self.manifests_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self._lock = threading.RLock()
        self._manifests: dict[bytes, Manifest] = {}
        sizes = [p.stat().st_size for p in self._chunk_files()]
        self._chunk_count = len(sizes)
        self._usage = sum(sizes) + sum(p.stat().st_size for p in self.manifests_dir.iterdir() if _is_hex_name(p.name))

    # -------------------------------------------------------- chunks

    def chunk_path(self, chunk: bytes) -> Path:
        h = _check_hash(chunk, "chunk hash").hex()
        return self.chunks_dir / h[:2] / h[2:4] / h

    def has(self, chunk: bytes) -> bool:
        return self.chunk_path(chunk).is_file()

    def put_chunk(self, chunk: bytes, data: bytes) -> bool:
        """Store ``data`` as chunk ``chunk`` after checking its hash; False if already held.

        Raises ChunkHashMismatch (nothing stored) or QuotaExceeded."""
        path = self.chunk_path(chunk)
        if len(data) > MAX_CHUNK_SIZE:
            raise ChunkHashMismatch(f"chunk {chunk.hex()}: {len(data)} bytes is over the {MAX_CHUNK_SIZE}-byte limit")
        if hashlib.sha256(data).digest() != chunk:
            raise ChunkHashMismatch(f"data does not hash to chunk {chunk.hex()}")
        return not path.is_file() and self._write(path, data)

    def get_chunk(self, chunk: bytes, *, verify: bool = True) -> bytes:
        """The bytes of a stored chunk; with ``verify`` a chunk corrupted on disk raises
        CorruptChunk and is deleted."""
        path = self.chunk_path(chunk)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ChunkNotFound(f"chunk {chunk.hex()} is not stored") from None
        if verify and hashlib.sha256(data).digest() != chunk:
            self._delete(path)
            raise CorruptChunk(f"chunk {chunk.hex()} was corrupted on disk and has been deleted")
        return data

    def read_range(self, chunk: bytes, offset: int, length: int) -> bytes:
        """``length`` bytes of a stored chunk from ``offset`` (unverified: a part cannot be)."""
        path = self.chunk_path(chunk)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset < 0 or length < 0 or offset + length > size:
                    raise InvalidRange(f"[{offset}, {offset + length}) is outside chunk {chunk.hex()} of {size} bytes")
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise ChunkNotFound(f"chunk {chunk.hex()} is not stored") from None

    # -------------------------------------------------------- manifests

    def put_manifest(self, data: bytes) -> tuple[bytes, Manifest]:
        """Decode, verify and store manifest bytes; returns ``(manifest id, manifest)``.

        Raises ShardDecodeError, InvalidManifest, BadManifestSignature or QuotaExceeded."""
        m = decode_manifest(data)
        verify_manifest(m)
        mid = hashlib.sha256(data).digest()
        path = self._manifest_path(mid)
        with self._lock:  # so that a concurrent remove() sees this manifest's chunks as pinned
            if not path.is_file():
                self._write(path, bytes(data))
            self._manifests[mid] = m
        return mid, m

    def add_manifest(self, m: Manifest) -> bytes:
        """Store a manifest object (verified first); returns its id."""
        return self.put_manifest(encode_manifest(m))[0]

    def has_manifest(self, manifest_id: bytes) -> bool:
        return self._manifest_path(manifest_id).is_file()

    def get_manifest_bytes(self, manifest_id: bytes) -> bytes:
        try:
            data = self._manifest_path(manifest_id).read_bytes()
        except FileNotFoundError:
            raise ManifestNotFound(f"manifest {manifest_id.hex()} is not stored") from None
        if hashlib.sha256(data).digest() != manifest_id:
            raise ShardDecodeError(f"stored manifest {manifest_id.hex()} was corrupted on disk")
        return data

    def get_manifest(self, manifest_id: bytes) -> Manifest:
        cached = self._manifests.get(manifest_id)
        if cached is not None and self.has_manifest(manifest_id):
            return cached
        m = decode_manifest(self.get_manifest_bytes(manifest_id))
        self._manifests[manifest_id] = m
        return m

    def manifest_ids(self) -> list[bytes]:
        return sorted(bytes.fromhex(p.name) for p in self.manifests_dir.iterdir() if _is_hex_name(p.name))

    # -------------------------------------------------------- models

    def present(self, m: Manifest) -> list[bool]:
        """For each chunk index of ``m``, whether the chunk is stored."""
        return [self.has(h) for h in m.chunk_hashes()]

    def missing(self, m: Manifest) -> list[int]:
        """Chunk indices of ``m`` not stored yet, ascending: what a (resumed) fetch still needs."""
        return [i for i, held in enumerate(self.present(m)) if not held]

    def is_complete(self, m: Manifest) -> bool:
        return all(self.has(h) for h in m.chunk_hashes())

    def verify_model(self, m: Manifest) -> list[int]:
        """Re-hash every stored chunk of ``m``; returns the indices missing or found corrupt
        (corrupt files are deleted). Reads the whole model."""
        bad = []
        for span in m.chunk_spans():
            try:
                self.get_chunk(span.hash)
            except (ChunkNotFound, CorruptChunk):
                bad.append(span.index)
        return bad

    def import_files(self, m: Manifest, root: Path) -> int:
        """Store the chunks of ``m`` from its files under ``root`` (publishing), checking each
        chunk against the manifest; returns the number of chunks newly written."""
        written = 0
        for f in m.files:
            with open(Path(root) / f.path, "rb") as fh:
                for i, chunk in enumerate(f.chunks):
                    data = fh.read(m.chunk_size)
                    if hashlib.sha256(data).digest() != chunk:
                        raise ChunkHashMismatch(f"{f.path} chunk {i} differs from the manifest (file changed?)")
                    path = self.chunk_path(chunk)
                    written += not path.is_file() and self._write(path, data)
                if fh.read(1):
                    raise ChunkHashMismatch(f"{f.path} is longer than the manifest says")
        return written

    def assemble(self, m: Manifest, dest: Path) -> list[Path]:
        """Write every file of ``m`` under ``dest`` from verified chunks, check each file's
        SHA-256 and tensor table, and rename it into place; returns the file paths."""
        mid = hashlib.sha256(encode_manifest(m)).digest()
        missing = self.missing(m)
        if missing:
            raise MissingChunks(mid, missing)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        base = dest.resolve()
        out = []
        for f in m.files:
            target = dest / f.path
            if not target.parent.resolve().is_relative_to(base):
                raise UnsafePath(f"{target} is outside {dest} (a symlink on the way)")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
            try:
                whole = hashlib.sha256()
                with os.fdopen(fd, "wb") as out_file:
                    for chunk in f.chunks:
                        data = self.get_chunk(chunk)
                        whole.update(data)
                        out_file.write(data)
                    out_file.flush()
                    os.fsync(out_file.fileno())
                if whole.digest() != f.sha256:
                    raise FileHashMismatch(f"{f.path}: assembled bytes do not match the manifest's file hash")
                try:
                    header = read_header(tmp, f.size)
                except InvalidSafetensors as exc:
                    raise TensorTableMismatch(f"{f.path}: {exc}") from None
                if (header.data_offset, header.tensors) != (f.data_offset, f.tensors):
                    raise TensorTableMismatch(f"{f.path}: the file's header differs from the manifest's tensor table")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            out.append(target)
        return out

    def remove(self, manifest_id: bytes) -> int:
        """Delete a manifest and every chunk of it that no other stored manifest references;
        returns the bytes freed."""
        with self._lock:
            m = self.get_manifest(manifest_id)
            keep: set[bytes] = set()
            for other in self.manifest_ids():
                if other != manifest_id:
                    keep.update(self.get_manifest(other).chunk_hashes())
            freed = self._delete(self._manifest_path(manifest_id))
            self._manifests.pop(manifest_id, None)
            for chunk in set(m.chunk_hashes()) - keep:
                freed += self._delete(self.chunk_path(chunk))
            return freed

    def collect_garbage(self) -> int:
        """Delete chunks that no stored manifest references (left by a fetch whose manifest
        was removed, or by a crash); returns the bytes freed."""
        with self._lock:
            keep: set[bytes] = set()
            for mid in self.manifest_ids():
                keep.update(self.get_manifest(mid).chunk_hashes())
            freed = 0
            for path in list(self._chunk_files()):
                if bytes.fromhex(path.name) not in keep:
                    freed += self._delete(path)
            return freed

    # -------------------------------------------------------- accounting

    def usage(self) -> int:
        return self._usage

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            chunks=self._chunk_count,
            manifests=len(self.manifest_ids()),
            usage=self._usage,
            quota=self.quota,
        )

    # -------------------------------------------------------- internals

    def _manifest_path(self, manifest_id: bytes) -> Path:
        return self.manifests_dir / _check_hash(manifest_id, "manifest id").hex()

    def _is_chunk(self, path: Path) -> bool:
        return path.parent.parent.parent == self.chunks_dir

    def _chunk_files(self) -> Iterator[Path]:
        for a in self.chunks_dir.iterdir():
            if a.is_dir():
                for b in a.iterdir():
                    if b.is_dir():
                        yield from (p for p in b.iterdir() if _is_hex_name(p.name))

    def _write(self, path: Path, data: bytes) -> bool:
        """Write ``data`` to ``path`` atomically, charging the quota; False if another thread
        stored the same file first."""
        with self._lock:
            if self.quota is not None and self._usage + len(data) > self.quota:
                raise QuotaExceeded(len(data), self._usage, self.quota)
            self._usage += len(data)  # reserved now, so concurrent writers cannot overshoot
        stored = False
        try:
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                path.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    if not path.exists():
                        os.replace(tmp, path)
                        stored = True
                        self._chunk_count += self._is_chunk(path)
            finally:
                if not stored:
                    Path(tmp).unlink(missing_ok=True)
        finally:
            if not stored:
                with self._lock:
                    self._usage -= len(data)
        return stored

    def _delete(self, path: Path) -> int:
        """Unlink ``path``; returns the bytes freed (0 if it was already gone)."""
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return 0
            self._usage -= size
            self._chunk_count -= self._is_chunk(path)
            return size


def _check_hash(value: bytes, what: str) -> bytes:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes")
    return value


def _is_hex_name(name: str) -> bool:
    return len(name) == 2 * HASH_SIZE and all(c in "0123456789abcdef" for c in name)

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
from collections.abc import Iterable, Iterator
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
from .manifest import (
    HASH_SIZE,
    MAX_CHUNK_SIZE,
    ChunkSpan,
    Manifest,
    decode_manifest,
    encode_manifest,
    verify_manifest,
)

READ_BLOCK = 1 << 20
SYNC_EVERY = 32 << 20  # an Assembly writes back its files every this many bytes


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

    def put_chunk(self, chunk: bytes, data: bytes, *, sync: bool = True) -> bool:
        """Store ``data`` as chunk ``chunk`` after checking its hash; False if already held.

        ``sync=False`` skips the fsync (a fetch syncs its chunks once at the end, see
        ``sync_chunks``; a chunk torn by a crash before that fails verification when read and
        is deleted, so it counts as missing again). Raises ChunkHashMismatch (nothing stored)
        or QuotaExceeded."""
        path = self.chunk_path(chunk)
        if len(data) > MAX_CHUNK_SIZE:
            raise ChunkHashMismatch(f"chunk {chunk.hex()}: {len(data)} bytes is over the {MAX_CHUNK_SIZE}-byte limit")
        if hashlib.sha256(data).digest() != chunk:
            raise ChunkHashMismatch(f"data does not hash to chunk {chunk.hex()}")
        return not path.is_file() and self._write(path, data, sync=sync)

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

    def open_assembly(self, m: Manifest, dest: Path) -> Assembly:
        """An :class:`Assembly` of ``m`` under ``dest``: a fetch writes each verified chunk into
        it as it arrives, so the files are ready (and hashed) when the last chunk is stored."""
        return Assembly(self, m, Path(dest))

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

    def sync_chunks(self, chunks: Iterable[bytes]) -> None:
        """fsync the files of these chunks (written with ``sync=False``) and their folders."""
        folders = set()
        for chunk in chunks:
            path = self.chunk_path(chunk)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folders.add(path.parent)
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write(self, path: Path, data: bytes, *, sync: bool = True) -> bool:
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
                    if sync:
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


class Assembly:
    """A model's files written in place while its chunks arrive.

    Each file is a ``.partial`` file of its final size under ``dest``; ``write(index, data)``
    (data already verified against the chunk hash) writes a chunk at its offset and feeds the
    file's SHA-256 as far as the chunks are contiguous (a chunk that arrived early is read back
    from the partial file, from the page cache, when its turn comes). ``finish()`` copies in the
    chunks that were already stored before (a resumed fetch), checks every file's SHA-256 and
    tensor table, fsyncs and renames into place. ``abort()`` deletes the partial files.
    Thread-safe: fetch workers write from several threads at once.
    """

    def __init__(self, store: ShardStore, m: Manifest, dest: Path) -> None:
        self.store = store
        self.m = m
        self.dest = dest
        self._lock = threading.Lock()
        self._spans: list[ChunkSpan] = list(m.chunk_spans())
        self._written = bytearray(m.chunk_count)
        self._first = [m.first_chunk(i) for i in range(len(m.files))]
        self._next = list(self._first)  # per file: the first chunk index not hashed yet
        self._hashes = [hashlib.sha256() for _ in m.files]
        self._fds: list[int] = []
        self._tmps: list[Path] = []
        self._unsynced = 0
        dest.mkdir(parents=True, exist_ok=True)
        base = dest.resolve()
        try:
            for f in m.files:
                target = dest / f.path
                if not target.parent.resolve().is_relative_to(base):
                    raise UnsafePath(f"{target} is outside {dest} (a symlink on the way)")
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
                self._fds.append(fd)
                self._tmps.append(Path(tmp))
                os.ftruncate(fd, f.size)
        except BaseException:
            self.abort()
            raise

    def write(self, index: int, data: bytes) -> None:
        """Write verified chunk ``index`` (the caller checked its hash) at its place."""
        span = self._spans[index]
        if len(data) != span.length:
            raise ChunkHashMismatch(f"chunk {index} is {len(data)} bytes, the manifest says {span.length}")
        fd = self._fds[span.file_index]
        os.pwrite(fd, data, span.offset)
        with self._lock:
            self._written[index] = 1
            self._advance(span.file_index, index, data)
            self._unsynced += len(data)
            flush = self._unsynced >= SYNC_EVERY
            if flush:
                self._unsynced = 0
        if flush:  # write back as we go, so finish() does not wait for the whole model to reach the disk
            for f in list(self._fds):
                os.fdatasync(f)

    def _advance(self, file_index: int, index: int, data: bytes) -> None:
        """Feed the file hash through every contiguous written chunk (under the lock)."""
        end = self._first[file_index] + len(self.m.files[file_index].chunks)
        while self._next[file_index] < end and self._written[self._next[file_index]]:
            i = self._next[file_index]
            span = self._spans[i]
            piece = data if i == index else os.pread(self._fds[file_index], span.length, span.offset)
            self._hashes[file_index].update(piece)
            self._next[file_index] += 1

    def finish(self) -> list[Path]:
        """Fill in the chunks stored earlier, check every file, fsync and rename into place."""
        for span in self._spans:
            if not self._written[span.index]:
                try:  # stored by an earlier run, maybe unsynced before a crash: verified again
                    data = self.store.get_chunk(span.hash)
                except (ChunkNotFound, CorruptChunk):
                    mid = hashlib.sha256(encode_manifest(self.m)).digest()
                    raise MissingChunks(mid, [s.index for s in self._spans if not self._written[s.index]]) from None
                self.write(span.index, data)
        out = []
        for i, f in enumerate(self.m.files):
            if self._hashes[i].digest() != f.sha256:
                raise FileHashMismatch(f"{f.path}: assembled bytes do not match the manifest's file hash")
            try:
                header = read_header(str(self._tmps[i]), f.size)
            except InvalidSafetensors as exc:
                raise TensorTableMismatch(f"{f.path}: {exc}") from None
            if (header.data_offset, header.tensors) != (f.data_offset, f.tensors):
                raise TensorTableMismatch(f"{f.path}: the file's header differs from the manifest's tensor table")
            os.fsync(self._fds[i])
        for i, f in enumerate(self.m.files):
            os.close(self._fds[i])
            target = self.dest / f.path
            os.replace(self._tmps[i], target)
            out.append(target)
        self._fds, self._tmps = [], []
        return out

    def abort(self) -> None:
        """Delete the partial files, and the folders under ``dest`` (``dest`` too) left empty."""
        for fd in self._fds:
            os.close(fd)
        for tmp in self._tmps:
            tmp.unlink(missing_ok=True)
        if self._tmps:
            for folder in sorted({t.parent for t in self._tmps} | {self.dest}, key=lambda p: -len(p.parts)):
                while folder != self.dest.parent and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
                    folder = folder.parent
        self._fds, self._tmps = [], []

"""The local model store of one node: signed manifests, the model files, and which of their
chunks hold verified bytes.

    <root>/manifests/<id hex>     canonical manifest bytes, named by the manifest id
    <root>/have/<id hex>          the verified-chunk record of that model (see below)
    <root>/tmp/                   manifests and records being written (emptied at open)
    <models>/<id hex>/<path>      a complete model's files, named as its manifest names them
    <models>/<id hex>.partial/    a model being fetched: its files at full size, filled in place

``<models>`` is ``models_dir``, by default the ``models`` folder beside ``root`` (``<home>/models``).

A model's bytes are on disk once, in its files: a fetch writes each verified chunk straight to
its offset (:class:`~prsm_node.shards.assembly.Assembly`), publishing copies the source files in
once, and the responder serves a chunk by reading its byte range from the file (the manifest
maps chunk indices to file offsets). There is no separate chunk copy.

**The verified-chunk record** (``have/``) says which chunks of a model's files hold bytes that
hashed to the manifest when they were written. It is replaced atomically (tmp, fsync, rename)
and only ever extended after the file data it covers was flushed (fdatasync), so after a crash
it may lack chunks that were written (they are fetched again) but never names one that was not:
a resumed fetch never downloads a verified chunk twice and never trusts an unverified one.
Reads verify again: a chunk that no longer hashes right (a file edited or damaged on disk) is
taken out of the record and ``CorruptChunk`` says which file and range; the node goes on, and
fetching the model again rewrites that chunk in place. A model's folder is named ``<id hex>``
once every chunk was verified and every file's SHA-256 and tensor table checked.

The quota counts the manifests and the full size of every model with files here: a fetch or a
publish reserves its model's whole size before it writes anything. A chunk shared by two models
is stored in each of them.

All methods block on file I/O: the service calls them through ``trio.to_thread.run_sync``. They
are safe to call from several threads at once (one process per store: node.lock).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .exceptions import (
    ChunkNotFound,
    CorruptChunk,
    FileHashMismatch,
    ManifestNotFound,
    MissingChunks,
    ModelBusy,
    QuotaExceeded,
    ShardDecodeError,
    UnsafePath,
)
from .manifest import HASH_SIZE, ChunkSpan, Manifest, decode_manifest, encode_manifest, verify_manifest

if TYPE_CHECKING:
    from .assembly import Assembly

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
PARTIAL = ".partial"
SETTLED = 2.0  # seconds: a file changed more recently than this is re-hashed on every read
_HAVE_MAGIC = b"PRSMHAV1"
_HAVE_HEAD = struct.Struct(">8sI")  # magic, chunk count; then the bitmap, then SHA-256(all before)[:8]


@dataclass(frozen=True)
class StoreStatistics:
    chunks: int  # verified chunks over all models
    manifests: int
    usage: int
    quota: int | None


class ShardStore:
    """Manifests under ``root``, model files under ``models_dir``; ``quota`` (bytes) bounds both."""

    def __init__(self, root: Path, *, quota: int | None = None, models_dir: Path | None = None) -> None:
        if quota is not None and quota < 0:
            raise ValueError("quota must be non-negative")
        self.root = Path(root)
        self.models_dir = Path(models_dir) if models_dir is not None else self.root.parent / "models"
        self.manifests_dir = self.root / "manifests"
        self.have_dir = self.root / "have"
        self.tmp_dir = self.root / "tmp"
        self.quota = quota
        for d in (self.manifests_dir, self.have_dir, self.tmp_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self._lock = threading.RLock()
        self._manifests: dict[bytes, Manifest] = {}
        self._ids: dict[int, bytes] = {}  # id(cached Manifest object) -> its manifest id
        self._spans: dict[bytes, list[ChunkSpan]] = {}
        self._have: dict[bytes, bytearray] = {}  # one byte per chunk: 1 = verified
        self._open: set[bytes] = set()  # models an Assembly is writing
        self._hashed: dict[tuple[bytes, int], tuple[int, ...]] = {}  # chunk -> its file's stamp when last hashed
        self._reserved: dict[bytes, int] = {}  # models with files here -> bytes charged
        self._usage = sum(p.stat().st_size for p in self.manifests_dir.iterdir() if _is_hex_name(p.name))
        for folder in self.models_dir.iterdir():
            mid = _folder_id(folder.name)
            if mid is not None and folder.is_dir():
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                self._reserved[mid] = self._reserved.get(mid, 0) + size
                self._usage += size
        self._chunk_count = sum(_count_record(p) for p in self.have_dir.iterdir() if _is_hex_name(p.name))

    # -------------------------------------------------------- manifests

    def put_manifest(self, data: bytes) -> tuple[bytes, Manifest]:
        """Decode, verify and store manifest bytes; returns ``(manifest id, manifest)``.

        Raises ShardDecodeError, InvalidManifest, BadManifestSignature or QuotaExceeded."""
        m = decode_manifest(data)
        verify_manifest(m)
        mid = hashlib.sha256(data).digest()
        path = self._manifest_path(mid)
        with self._lock:
            if not path.is_file():
                self._charge(len(data))
                try:
                    self._write_file(path, bytes(data))
                except BaseException:
                    self._usage -= len(data)
                    raise
            self._cache(mid, m)
        return mid, m

    def add_manifest(self, m: Manifest) -> bytes:
        """Store a manifest object (verified first); returns its id."""
        return self.put_manifest(encode_manifest(m))[0]

    def has_manifest(self, manifest_id: bytes) -> bool:
        return manifest_id in self._manifests or self._manifest_path(manifest_id).is_file()

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
        if cached is not None:
            return cached
        m = decode_manifest(self.get_manifest_bytes(manifest_id))
        with self._lock:
            return self._cache(manifest_id, m)

    def cached_manifest(self, manifest_id: bytes) -> Manifest | None:
        """The manifest if it was read or stored since the store opened (no I/O), else None."""
        return self._manifests.get(manifest_id)

    def manifest_ids(self) -> list[bytes]:
        return sorted(bytes.fromhex(p.name) for p in self.manifests_dir.iterdir() if _is_hex_name(p.name))

    def spans(self, manifest_id: bytes) -> list[ChunkSpan]:
        """Where each chunk of a stored model lies (file, offset, length), by chunk index."""
        spans = self._spans.get(manifest_id)
        if spans is None:
            spans = self._spans[manifest_id] = list(self.get_manifest(manifest_id).chunk_spans())
        return spans

    # -------------------------------------------------------- which chunks are here

    def present(self, model: bytes | Manifest) -> list[bool]:
        """For each chunk index of a stored model (by id or manifest), whether it is verified here."""
        return [bool(b) for b in self._state(self._mid(model))]

    def missing(self, model: bytes | Manifest) -> list[int]:
        """Chunk indices not verified here yet, ascending: what a (resumed) fetch still needs."""
        return [i for i, b in enumerate(self._state(self._mid(model))) if not b]

    def is_complete(self, model: bytes | Manifest) -> bool:
        """Every chunk verified and the files checked: the model's folder is ready to load."""
        mid = self._mid(model)
        return all(self._state(mid)) and self.model_dir(mid).is_dir()

    def model_dir(self, manifest_id: bytes) -> Path:
        """The folder of a complete model (``<models>/<id hex>``)."""
        return self.models_dir / _check_hash(manifest_id, "manifest id").hex()

    def partial_dir(self, manifest_id: bytes) -> Path:
        return self.models_dir / (_check_hash(manifest_id, "manifest id").hex() + PARTIAL)

    def files(self, model: bytes | Manifest) -> list[Path]:
        """The file paths of a complete model; MissingChunks when it is not complete."""
        mid = self._mid(model)
        if not self.is_complete(mid):
            raise MissingChunks(mid, self.missing(mid))
        folder = self.model_dir(mid)
        return [folder / f.path for f in self.get_manifest(mid).files]

    def mark(self, manifest_id: bytes, indices: list[int]) -> None:
        """Record chunks as verified. The caller checked their hashes and flushed their bytes
        to disk first (fdatasync): the record never gets ahead of the data."""
        if not indices:
            return
        with self._lock:
            have = self._state(manifest_id)
            added = 0
            for i in indices:
                added += not have[i]
                have[i] = 1
            if added:
                self._chunk_count += added
                self._save_state(manifest_id, have)

    def discard(self, manifest_id: bytes, indices: list[int]) -> None:
        """Take chunks out of the record (found corrupt, or their file lost): they count as
        missing, are not served, and a fetch writes them again."""
        with self._lock:
            have = self._state(manifest_id)
            dropped = 0
            for i in indices:
                dropped += have[i]
                have[i] = 0
                self._hashed.pop((manifest_id, i), None)
            if dropped:
                self._chunk_count -= dropped
                self._save_state(manifest_id, have)

    # -------------------------------------------------------- reading chunks

    def read_chunk(self, manifest_id: bytes, index: int, *, verify: bool = True) -> bytes:
        """The bytes of chunk ``index`` of a model, read from its file. ChunkNotFound when it
        is not verified here; with ``verify``, bytes that no longer hash to the manifest raise
        CorruptChunk (naming the file and range), and the chunk is taken out of the record.

        A chunk is re-hashed on its first read by this store and whenever its file changed
        since (inode, size, mtime or ctime differ); a file changed less than ``SETTLED``
        seconds ago is re-hashed on every read, so a change within one timestamp tick of the
        last hash cannot go unseen (git's "racily clean" rule)."""
        have = self._state(manifest_id)
        if not 0 <= index < len(have) or not have[index]:
            raise ChunkNotFound(f"chunk {index} of model {manifest_id.hex()} is not here")
        span = self.spans(manifest_id)[index]
        path = self.get_manifest(manifest_id).files[span.file_index].path
        try:
            data, stamp = self._pread(manifest_id, path, span.offset, span.length)
        except FileNotFoundError:
            lost = [s.index for s in self.spans(manifest_id) if s.file_index == span.file_index]
            self.discard(manifest_id, lost)
            log.warning("model file missing", extra={"id": manifest_id.hex()[:16], "file": path})
            raise CorruptChunk(f"model {manifest_id.hex()}: file {path} is missing from the store; "
                               f"its {len(lost)} chunks are no longer served") from None
        key = (manifest_id, index)
        hashed = stamp is not None and self._hashed.get(key) == stamp
        if len(data) != span.length or (verify and not hashed and hashlib.sha256(data).digest() != span.hash):
            self.discard(manifest_id, [index])
            log.warning("corrupt chunk on disk", extra={"id": manifest_id.hex()[:16], "file": path, "index": index})
            raise CorruptChunk(f"model {manifest_id.hex()}: chunk {index} ({path} bytes [{span.offset}, "
                               f"{span.offset + span.length})) does not match its hash: the file was changed "
                               "or damaged on disk; the chunk is no longer served (fetch the model again to repair)")
        if verify and stamp is not None:
            self._hashed[key] = stamp
        return data

    def _pread(self, manifest_id: bytes, path: str, offset: int, length: int) -> tuple[bytes, tuple[int, ...] | None]:
        """The bytes, and the file's stamp if it did not change during the read and has been
        settled for ``SETTLED`` seconds (else None: the bytes must be hashed)."""
        for folder in (self.model_dir(manifest_id), self.partial_dir(manifest_id)):
            try:
                fd = os.open(folder / path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # not there, or renamed into place just now: try the other name
            try:
                before = _stamp(os.fstat(fd))
                data = os.pread(fd, length, offset)
                after = _stamp(os.fstat(fd))
            finally:
                os.close(fd)
            settled = max(after[2], after[3]) < (time.time() - SETTLED) * 1e9
            return data, after if before == after and settled else None
        raise FileNotFoundError(path)

    def verify_model(self, model: bytes | Manifest) -> list[int]:
        """Re-hash every verified chunk of a model; returns the indices missing or found corrupt
        (those found corrupt leave the record). Reads the whole model."""
        mid = self._mid(model)
        bad = []
        for i in range(len(self._state(mid))):
            try:
                self.read_chunk(mid, i)
            except (ChunkNotFound, CorruptChunk):
                bad.append(i)
        return bad

    # -------------------------------------------------------- writing models

    def open_assembly(self, m: Manifest) -> Assembly:
        """An :class:`Assembly` writing the files of stored manifest ``m`` in place (a fetch or
        a publish); reserves the model's size against the quota first. Close it when done."""
        from .assembly import Assembly

        return Assembly(self, self._mid(m), m)

    def import_files(self, m: Manifest, root: Path) -> int:
        """Copy the files of stored manifest ``m`` from ``root`` into the store (publishing),
        checking every chunk against the manifest; returns the number of chunks written (0 when
        the model is complete here already). ChunkHashMismatch when a file changed since."""
        from .assembly import import_into

        mid = self._mid(m)
        if self.is_complete(mid):
            return 0
        asm = self.open_assembly(m)
        try:
            return import_into(asm, m, Path(root))
        finally:
            asm.close()

    def assemble(self, m: Manifest, dest: Path) -> list[Path]:
        """The files of a complete model under ``dest``: its own folder (nothing to do), or a
        checked copy elsewhere. MissingChunks when the model is not complete here."""
        mid = self._mid(m)
        files = self.files(mid)
        dest = Path(dest)
        if dest.resolve() == self.model_dir(mid).resolve():
            return files
        dest.mkdir(parents=True, exist_ok=True)
        base = dest.resolve()
        out = []
        for f, src in zip(m.files, files, strict=True):
            target = dest / f.path
            if not target.parent.resolve().is_relative_to(base):
                raise UnsafePath(f"{target} is outside {dest} (a symlink on the way)")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent)
            try:
                whole = hashlib.sha256()
                with os.fdopen(fd, "wb") as out_file, open(src, "rb") as in_file:
                    while block := in_file.read(READ_BLOCK):
                        whole.update(block)
                        out_file.write(block)
                    out_file.flush()
                    os.fsync(out_file.fileno())
                if whole.digest() != f.sha256:
                    raise FileHashMismatch(f"{src} no longer matches the manifest's file hash (changed on disk)")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            out.append(target)
        return out

    def remove(self, manifest_id: bytes) -> int:
        """Delete a model: its manifest, record and files; returns the bytes freed."""
        with self._lock:
            if manifest_id in self._open:
                raise ModelBusy(f"model {manifest_id.hex()} is being written; cancel its fetch first")
            if not self.has_manifest(manifest_id):
                raise ManifestNotFound(f"manifest {manifest_id.hex()} is not stored")
            freed = self._delete(self._manifest_path(manifest_id))
            self._have_path(manifest_id).unlink(missing_ok=True)
            self._chunk_count -= sum(self._have.pop(manifest_id, b""))
            freed += self._drop_files(manifest_id)
            m = self._manifests.pop(manifest_id, None)
            if m is not None:
                self._ids.pop(id(m), None)
            self._spans.pop(manifest_id, None)
            for key in [k for k in self._hashed if k[0] == manifest_id]:
                del self._hashed[key]
            return freed

    def collect_garbage(self) -> int:
        """Delete files and records of models whose manifest is not stored (left by a crash);
        returns the bytes freed."""
        with self._lock:
            keep = set(self.manifest_ids())
            freed = 0
            for folder in list(self.models_dir.iterdir()):
                mid = _folder_id(folder.name)
                if mid is not None and mid not in keep and mid not in self._open:
                    freed += self._drop_files(mid)
            for path in list(self.have_dir.iterdir()):
                if _is_hex_name(path.name) and bytes.fromhex(path.name) not in keep:
                    self._chunk_count -= _count_record(path)
                    path.unlink(missing_ok=True)
            return freed

    # -------------------------------------------------------- accounting

    def usage(self) -> int:
        return self._usage

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(chunks=self._chunk_count, manifests=len(self.manifest_ids()), usage=self._usage,
                               quota=self.quota)

    # -------------------------------------------------------- for Assembly

    def _begin(self, manifest_id: bytes, size: int) -> None:
        """Reserve a model's bytes (once) and mark it open for writing."""
        with self._lock:
            if manifest_id in self._open:
                raise ModelBusy(f"model {manifest_id.hex()} is already being written")
            if manifest_id not in self._reserved:
                self._charge(size)
                self._reserved[manifest_id] = size
            self._open.add(manifest_id)

    def _end(self, manifest_id: bytes, *, keep: bool) -> None:
        """Writing stopped; without ``keep`` (nothing was written) the files are deleted."""
        with self._lock:
            self._open.discard(manifest_id)
            if not keep:
                self._drop_files(manifest_id)

    # -------------------------------------------------------- internals

    def _mid(self, model: bytes | Manifest) -> bytes:
        if isinstance(model, bytes):
            return model
        mid = self._ids.get(id(model))
        if mid is not None and self._manifests.get(mid) is model:
            return mid
        mid = hashlib.sha256(encode_manifest(model)).digest()
        if mid not in self._manifests and not self.has_manifest(mid):
            raise ManifestNotFound(f"manifest {mid.hex()} ({model.name}:{model.version}) is not stored")
        return mid

    def _cache(self, mid: bytes, m: Manifest) -> Manifest:
        current = self._manifests.setdefault(mid, m)
        self._ids[id(current)] = mid
        return current

    def _state(self, manifest_id: bytes) -> bytearray:
        have = self._have.get(manifest_id)
        if have is None:
            count = self.get_manifest(manifest_id).chunk_count
            with self._lock:
                have = self._have.get(manifest_id)
                if have is None:
                    have = self._have[manifest_id] = _load_record(self._have_path(manifest_id), count)
        return have

    def _save_state(self, manifest_id: bytes, have: bytearray) -> None:
        bits = bytearray((len(have) + 7) // 8)
        for i, b in enumerate(have):
            if b:
                bits[i >> 3] |= 0x80 >> (i & 7)
        body = _HAVE_HEAD.pack(_HAVE_MAGIC, len(have)) + bytes(bits)
        self._write_file(self._have_path(manifest_id), body + hashlib.sha256(body).digest()[:8])

    def _charge(self, size: int) -> None:
        with self._lock:
            if self.quota is not None and self._usage + size > self.quota:
                raise QuotaExceeded(size, self._usage, self.quota)
            self._usage += size

    def _drop_files(self, manifest_id: bytes) -> int:
        for folder in (self.model_dir(manifest_id), self.partial_dir(manifest_id)):
            shutil.rmtree(folder, ignore_errors=True)
        freed = self._reserved.pop(manifest_id, 0)
        self._usage -= freed
        return freed

    def _manifest_path(self, manifest_id: bytes) -> Path:
        return self.manifests_dir / _check_hash(manifest_id, "manifest id").hex()

    def _have_path(self, manifest_id: bytes) -> Path:
        return self.have_dir / _check_hash(manifest_id, "manifest id").hex()

    def _write_file(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically and durably (tmp, fsync, rename, fsync dir)."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        sync_dir(path.parent)

    def _delete(self, path: Path) -> int:
        """Unlink a manifest file; returns the bytes freed (0 if it was already gone)."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        self._usage -= size
        return size


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_record(path: Path, count: int) -> bytearray:
    """The verified-chunk bytes (one per chunk) from a record file; all zero when there is
    none or it does not check out (torn, another model's, edited): nothing unverified is trusted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return bytearray(count)
    size = _HAVE_HEAD.size + (count + 7) // 8
    if (len(data) != size + 8 or data[:_HAVE_HEAD.size] != _HAVE_HEAD.pack(_HAVE_MAGIC, count)
            or hashlib.sha256(data[:size]).digest()[:8] != data[size:]):
        log.warning("verified-chunk record unreadable; the model's chunks count as missing",
                    extra={"file": str(path)})
        return bytearray(count)
    bits = data[_HAVE_HEAD.size:size]
    return bytearray((bits[i >> 3] >> (7 - (i & 7))) & 1 for i in range(count))


def _count_record(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < _HAVE_HEAD.size + 8 or data[:8] != _HAVE_MAGIC:
        return 0
    return sum(bin(b).count("1") for b in data[_HAVE_HEAD.size:-8])


def _check_hash(value: bytes, what: str) -> bytes:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes")
    return value


def _is_hex_name(name: str) -> bool:
    return len(name) == 2 * HASH_SIZE and all(c in "0123456789abcdef" for c in name)


def _folder_id(name: str) -> bytes | None:
    """The manifest id a model folder (``<hex>`` or ``<hex>.partial``) belongs to, or None."""
    base = name.removesuffix(PARTIAL)
    return bytes.fromhex(base) if _is_hex_name(base) else None

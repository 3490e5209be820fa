"""Model manifests: what a published model is, chunk by chunk and tensor by tensor, signed.

A model is one or more safetensors files. Each file's bytes are cut into ``chunk_size`` pieces
(the last one shorter), each addressed by its SHA-256. The manifest lists the files in path
order (relative path, size, whole-file SHA-256, where the tensor data starts, chunk hashes, and
the tensor table with absolute byte ranges) plus the model's name, version, description,
license, capability tags and free-form metadata, the publisher's Ed25519 key, a creation time
and the publisher's signature. Chunk *indices* run over the files in order (file 0's chunks,
then file 1's, ...); the wire protocol names chunks by index.

The encoding is canonical msgpack (fixed-order arrays, shortest forms, metadata map keys sorted
by UTF-8 bytes, floats as float64), the schema is in protocols/shard.md. ``decode_manifest`` is
strict: untrusted bytes are size-checked, parsed, checked against every rule (including the
internal consistency ``verify_manifest`` relies on) and re-encoded to the same bytes; only the
signature is left to ``verify_manifest``. The manifest id is the SHA-256 of the full encoding,
signature included, so one signed manifest has exactly one id.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from ..strict_msgpack import unpack_strict
from .exceptions import BadManifestSignature, InvalidManifest, ShardDecodeError
from .header import DTYPE_SIZES, MAX_RANK, MAX_TENSOR_NAME, TensorInfo, tensor_order, tiling_problem

FORMAT_VERSION = 1
MANIFEST_DOMAIN = "prsm-manifest-v1"
HASH_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 1 << 22
MAX_MANIFEST_SIZE = 4 << 20
MAX_FILES = 1024
MAX_CHUNKS = 1 << 16  # over all files
MAX_TENSORS = 1 << 16  # over all files
MAX_PATH_SIZE = 256  # UTF-8 bytes, whole relative path
MAX_NAME_SIZE = 128
MAX_VERSION_SIZE = 64
MAX_DESCRIPTION_SIZE = 4096
MAX_LICENSE_SIZE = 64
MAX_TAGS = 32
MAX_TAG_SIZE = 32
MAX_METADATA_SIZE = 64 * 1024  # encoded
MAX_METADATA_DEPTH = 8
MAX_METADATA_KEY_SIZE = 256
MIN_FILE_SIZE = 10  # 8-byte length + "{}"
MAX_HEADER_OFFSET = 8 + (8 << 20)
_U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
SUFFIX = ".safetensors"

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
TAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


@dataclass(frozen=True)
class FileEntry:
    """One safetensors file of a model. ``data_offset`` is 8 + the header length; ``tensors``
    are in canonical order (byte range, then name) and tile ``[data_offset, size)``."""

    path: str
    size: int
    sha256: bytes
    data_offset: int
    chunks: tuple[bytes, ...]
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """A signed model manifest. ``metadata`` is JSON-like data (str keys; str, int, bool,
    finite float, list and dict values); treat it as read-only."""

    name: str
    version: str
    description: str
    license: str
    tags: tuple[str, ...]
    metadata: dict[str, Any]
    chunk_size: int
    files: tuple[FileEntry, ...]
    total_size: int
    publisher: bytes
    created: int
    signature: bytes = b""
    format: int = FORMAT_VERSION

    @property
    def chunk_count(self) -> int:
        return sum(len(f.chunks) for f in self.files)

    def chunk_hashes(self) -> tuple[bytes, ...]:
        """Every chunk hash, by chunk index."""
        return tuple(h for f in self.files for h in f.chunks)

    def chunk_spans(self) -> Iterator[ChunkSpan]:
        """Where each chunk index lies: which file, at which offset, how long."""
        index = 0
        for file_index, f in enumerate(self.files):
            for i, h in enumerate(f.chunks):
                offset = i * self.chunk_size
                yield ChunkSpan(index, h, file_index, offset, min(self.chunk_size, f.size - offset))
                index += 1

    def first_chunk(self, file_index: int) -> int:
        """The chunk index of the first chunk of ``files[file_index]``."""
        return sum(len(f.chunks) for f in self.files[:file_index])

    def chunks_for_range(self, file_index: int, begin: int, end: int) -> range:
        """Chunk indices holding bytes ``[begin, end)`` of ``files[file_index]`` (a tensor's range)."""
        if not 0 <= begin <= end <= self.files[file_index].size:
            raise ValueError(f"range [{begin}, {end}) is outside file {file_index}")
        first = self.first_chunk(file_index)
        if begin == end:
            return range(first, first)
        return range(first + begin // self.chunk_size, first + (end - 1) // self.chunk_size + 1)


@dataclass(frozen=True)
class ChunkSpan:
    index: int
    hash: bytes
    file_index: int
    offset: int
    length: int


def chunk_count_for(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


# ------------------------------------------------------------ checks


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def _check_str(value: object, what: str, low: int, high: int, pattern: re.Pattern[str] | None = None) -> str:
    if type(value) is not str or not low <= _utf8_size(value) <= high:
        raise InvalidManifest(f"{what} must be a string of {low}..{high} UTF-8 bytes, got {_describe(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidManifest(f"{what} {value!r} does not match {pattern.pattern}")
    return value


def _check_int(value: object, what: str, low: int = 0, high: int = _U64) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidManifest(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise InvalidManifest(f"{what} must be {size} bytes, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    if isinstance(value, bytes | str | list | tuple):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def path_problem(path: object) -> str | None:
    """Why ``path`` is not an acceptable file path, or None: a relative POSIX path of at most
    256 UTF-8 bytes, normalized (no empty, ``.`` or ``..`` component), no leading ``/``, no
    backslash, colon or control character, ending in ``.safetensors``."""
    if type(path) is not str or not 1 <= _utf8_size(path) <= MAX_PATH_SIZE:
        return f"a path must be a string of 1..{MAX_PATH_SIZE} UTF-8 bytes, got {_describe(path)}"
    if _BAD_PATH_CHARS.search(path):
        return f"path {path!r} holds a backslash, colon or control character"
    if path.startswith("/"):
        return f"path {path!r} is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return f"path {path!r} is not normalized (an empty, '.' or '..' component)"
    if not path.endswith(SUFFIX) or path.rsplit("/", 1)[-1] == SUFFIX:
        return f"path {path!r} does not name a {SUFFIX} file"
    return None


def _check_paths(paths: list[str]) -> None:
    for path in paths:
        problem = path_problem(path)
        if problem:
            raise InvalidManifest(problem)
    keys = [p.encode("utf-8") for p in paths]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise InvalidManifest("file paths must be unique and in ascending UTF-8 byte order")
    if len({p.casefold() for p in paths}) != len(paths):
        raise InvalidManifest("two file paths differ only in case")
    dirs = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    clash = dirs.intersection(paths)
    if clash:
        raise InvalidManifest(f"path {sorted(clash)[0]!r} is both a file and a folder")


def _check_meta_value(value: object, what: str, depth: int) -> None:
    if type(value) is str:
        if _utf8_size(value) < 0:
            raise InvalidManifest(f"{what} is not encodable as UTF-8")
    elif type(value) is bool:
        pass
    elif type(value) is int:
        if not _I64_MIN <= value <= _U64:
            raise InvalidManifest(f"{what} {value} does not fit a msgpack integer")
    elif type(value) is float:
        if not math.isfinite(value):
            raise InvalidManifest(f"{what} must be a finite number")
    elif type(value) is list or type(value) is dict:
        if depth >= MAX_METADATA_DEPTH:
            raise InvalidManifest(f"{what} nests deeper than {MAX_METADATA_DEPTH} levels")
        if type(value) is dict:
            _check_meta_map(value, what, depth + 1)
        else:
            for i, item in enumerate(value):
                _check_meta_value(item, f"{what}[{i}]", depth + 1)
    else:
        raise InvalidManifest(
            f"{what} has type {type(value).__name__}; metadata holds str, int, bool, float, list, dict"
        )


def _check_meta_map(value: dict[Any, Any], what: str, depth: int) -> None:
    for key, item in value.items():
        if type(key) is not str or not 1 <= _utf8_size(key) <= MAX_METADATA_KEY_SIZE:
            raise InvalidManifest(f"{what} keys must be strings of 1..{MAX_METADATA_KEY_SIZE} UTF-8 bytes")
        _check_meta_value(item, f"{what}[{key!r}]", depth)


def _check_tensor(t: object, what: str) -> TensorInfo:
    if not isinstance(t, TensorInfo):
        raise InvalidManifest(f"{what} must be a TensorInfo, got {type(t).__name__}")
    _check_str(t.name, f"{what} name", 1, MAX_TENSOR_NAME)
    if type(t.dtype) is not str or t.dtype not in DTYPE_SIZES:
        raise InvalidManifest(f"{what} {t.name!r} has an unknown dtype {t.dtype!r}")
    if type(t.shape) is not tuple or len(t.shape) > MAX_RANK:
        raise InvalidManifest(f"{what} {t.name!r} shape must be a tuple of at most {MAX_RANK} sizes")
    for d in t.shape:
        _check_int(d, f"{what} {t.name!r} dimension", 0, (1 << 63) - 1)
    begin = _check_int(t.begin, f"{what} begin")
    end = _check_int(t.end, f"{what} end")
    if math.prod(t.shape) * DTYPE_SIZES[t.dtype] != end - begin:
        raise InvalidManifest(f"{what} {t.name!r}: shape {list(t.shape)} of {t.dtype} is not {end - begin} bytes")
    return t


def _check_file(f: object, chunk_size: int, what: str) -> FileEntry:
    if not isinstance(f, FileEntry):
        raise InvalidManifest(f"{what} must be a FileEntry, got {type(f).__name__}")
    what = f"file {f.path!r}"
    size = _check_int(f.size, f"{what} size", MIN_FILE_SIZE)
    _check_bytes(f.sha256, HASH_SIZE, f"{what} sha256")
    _check_int(f.data_offset, f"{what} data offset", MIN_FILE_SIZE, min(size, MAX_HEADER_OFFSET))
    if type(f.chunks) is not tuple or len(f.chunks) != chunk_count_for(size, chunk_size):
        raise InvalidManifest(
            f"{what}: {size} bytes in {chunk_size}-byte chunks needs "
            f"{chunk_count_for(size, chunk_size)} chunk hashes, got {_describe(f.chunks)}"
        )
    for h in f.chunks:
        _check_bytes(h, HASH_SIZE, f"{what} chunk hash")
    if type(f.tensors) is not tuple:
        raise InvalidManifest(f"{what} tensors must be a tuple")
    tensors = [_check_tensor(t, f"{what} tensor") for t in f.tensors]
    keys = [tensor_order(t) for t in tensors]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise InvalidManifest(f"{what} tensors must be in (begin, end, name) order, without duplicates")
    if len({t.name for t in tensors}) != len(tensors):
        raise InvalidManifest(f"{what} names a tensor twice")
    problem = tiling_problem(tensors, f.data_offset, size)
    if problem:
        raise InvalidManifest(f"{what}: {problem}")
    return f


def validate_manifest(m: Manifest, *, signed: bool = True) -> None:
    """Check every field and the internal consistency of ``m`` (not its signature)."""
    if not isinstance(m, Manifest):
        raise InvalidManifest(f"expected a Manifest, got {type(m).__name__}")
    if type(m.format) is not int or m.format != FORMAT_VERSION:
        raise InvalidManifest(f"manifest format {m.format!r} is not {FORMAT_VERSION}")
    _check_str(m.name, "name", 1, MAX_NAME_SIZE, NAME_RE)
    _check_str(m.version, "version", 1, MAX_VERSION_SIZE, VERSION_RE)
    _check_str(m.description, "description", 0, MAX_DESCRIPTION_SIZE)
    _check_str(m.license, "license", 0, MAX_LICENSE_SIZE)
    if type(m.tags) is not tuple or len(m.tags) > MAX_TAGS:
        raise InvalidManifest(f"tags must be a tuple of at most {MAX_TAGS}")
    for tag in m.tags:
        _check_str(tag, "tag", 1, MAX_TAG_SIZE, TAG_RE)
    if any(a >= b for a, b in zip(m.tags, m.tags[1:], strict=False)):
        raise InvalidManifest("tags must be unique and sorted")
    if type(m.metadata) is not dict:
        raise InvalidManifest(f"metadata must be a dict, got {type(m.metadata).__name__}")
    _check_meta_map(m.metadata, "metadata", 0)
    if len(_pack(_canonical(m.metadata))) > MAX_METADATA_SIZE:
        raise InvalidManifest(f"metadata encodes to more than {MAX_METADATA_SIZE} bytes")
    chunk_size = _check_int(m.chunk_size, "chunk size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    if chunk_size & (chunk_size - 1):
        raise InvalidManifest(f"chunk size {chunk_size} is not a power of two")
    if type(m.files) is not tuple or not 1 <= len(m.files) <= MAX_FILES:
        raise InvalidManifest(f"files must be a tuple of 1..{MAX_FILES}")
    files = [_check_file(f, chunk_size, f"file {i}") for i, f in enumerate(m.files)]
    _check_paths([f.path for f in files])
    if sum(len(f.chunks) for f in files) > MAX_CHUNKS:
        raise InvalidManifest(f"more than {MAX_CHUNKS} chunks of {chunk_size} bytes (a larger chunk size fits more)")
    if sum(len(f.tensors) for f in files) > MAX_TENSORS:
        raise InvalidManifest(f"more than {MAX_TENSORS} tensors")
    if type(m.total_size) is not int or m.total_size != sum(f.size for f in files):
        raise InvalidManifest(f"total size {m.total_size!r} is not the sum of the file sizes")
    _check_bytes(m.publisher, PUBLIC_KEY_SIZE, "publisher")
    _check_int(m.created, "created")
    if signed:
        _check_bytes(m.signature, SIGNATURE_SIZE, "signature")


# ------------------------------------------------------------ encode


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _canonical(value: Any) -> Any:
    """Metadata in its canonical shape: maps with keys in UTF-8 byte order, recursively."""
    if type(value) is dict:
        return {k: _canonical(value[k]) for k in sorted(value, key=lambda k: k.encode("utf-8"))}
    if type(value) is list:
        return [_canonical(v) for v in value]
    return value


def _fields(m: Manifest) -> list[Any]:
    files = [
        [
            f.path,
            f.size,
            f.sha256,
            f.data_offset,
            b"".join(f.chunks),
            [[t.name, t.dtype, list(t.shape), t.begin, t.end] for t in f.tensors],
        ]
        for f in m.files
    ]
    return [
        m.format,
        m.name,
        m.version,
        m.description,
        m.license,
        list(m.tags),
        _canonical(m.metadata),
        m.chunk_size,
        files,
        m.total_size,
        m.publisher,
        m.created,
    ]


def encode_manifest(m: Manifest) -> bytes:
    """The canonical bytes of a signed manifest (see protocols/shard.md)."""
    validate_manifest(m)
    data = _pack([*_fields(m), m.signature])
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidManifest(f"encoded manifest is {len(data)} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")
    return data


def signing_payload(m: Manifest) -> bytes:
    """What the publisher signs: ``msgpack(["prsm-manifest-v1", format, name, ..., created])``."""
    validate_manifest(m, signed=False)
    return _pack([MANIFEST_DOMAIN, *_fields(m)])


def manifest_id(m: Manifest) -> bytes:
    """SHA-256 of the canonical encoding, signature included."""
    return hashlib.sha256(encode_manifest(m)).digest()


# ------------------------------------------------------------ decode


def unpack(data: bytes, limit: int, what: str) -> Any:
    """One msgpack value from untrusted ``data`` of at most ``limit`` bytes (no ext types)."""
    return unpack_strict(data, limit, what, ShardDecodeError)


def _array(value: Any, size: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) != size:
        raise ShardDecodeError(f"{what} must be an array of {size}, got {_describe(value)}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise ShardDecodeError(f"{what} must be an array, got {_describe(value)}")
    return value


def _parse_file(value: Any, i: int) -> FileEntry:
    f = _array(value, 6, f"file {i}")
    hashes = f[4]
    if type(hashes) is not bytes or len(hashes) % HASH_SIZE:
        raise ShardDecodeError(f"file {i} chunks must be bin of a multiple of {HASH_SIZE} bytes")
    tensors = []
    for j, t in enumerate(_list(f[5], f"file {i} tensors")):
        name, dtype, shape, begin, end = _array(t, 5, f"file {i} tensor {j}")
        tensors.append(TensorInfo(name, dtype, tuple(_list(shape, f"file {i} tensor {j} shape")), begin, end))
    chunks = tuple(hashes[k : k + HASH_SIZE] for k in range(0, len(hashes), HASH_SIZE))
    return FileEntry(f[0], f[1], f[2], f[3], chunks, tuple(tensors))


def decode_manifest(data: bytes) -> Manifest:
    """Parse and check a manifest from untrusted bytes (all but the signature, which
    ``verify_manifest`` checks); any defect raises ShardDecodeError."""
    f = _array(unpack(data, MAX_MANIFEST_SIZE, "manifest"), 13, "manifest")
    if f[0] != FORMAT_VERSION or type(f[0]) is not int:
        raise ShardDecodeError(f"manifest format {f[0]!r} is not supported (this node reads {FORMAT_VERSION})")
    m = Manifest(
        format=f[0],
        name=f[1],
        version=f[2],
        description=f[3],
        license=f[4],
        tags=tuple(_list(f[5], "tags")),
        metadata=f[6],
        chunk_size=f[7],
        files=tuple(_parse_file(v, i) for i, v in enumerate(_list(f[8], "files"))),
        total_size=f[9],
        publisher=f[10],
        created=f[11],
        signature=f[12],
    )
    try:
        encoded = encode_manifest(m)
    except InvalidManifest as exc:
        raise ShardDecodeError(f"invalid manifest: {exc}") from None
    if bytes(data) != encoded:
        raise ShardDecodeError("manifest is not in canonical form")
    return m


# ------------------------------------------------------------ signatures


def sign_manifest(key: nacl.signing.SigningKey, m: Manifest) -> Manifest:
    """``m`` with ``publisher`` set to ``key``'s public key and signed by it."""
    unsigned = replace(m, publisher=bytes(key.verify_key), signature=b"")
    return replace(unsigned, signature=key.sign(signing_payload(unsigned)).signature)


def verify_manifest(m: Manifest) -> None:
    """Check every rule (InvalidManifest) and the publisher's signature (BadManifestSignature)."""
    validate_manifest(m)
    try:
        nacl.signing.VerifyKey(m.publisher).verify(signing_payload(m), m.signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise BadManifestSignature(f"manifest {m.name}:{m.version} is not signed by {m.publisher.hex()}") from None

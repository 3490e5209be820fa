"""Building a manifest from a safetensors file or a folder of them (publishing).

Reads every byte once: the header for the tensor table, then chunk by chunk for the chunk
hashes and the whole-file hash. Blocking: the service calls it through
``trio.to_thread.run_sync``. The files are then copied into the store with
``ShardStore.import_files``, which re-reads them and checks each chunk against the manifest (the files may have
changed in between).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nacl.signing

from .exceptions import InvalidManifest, InvalidSafetensors
from .header import read_header
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_FILES,
    MIN_CHUNK_SIZE,
    SUFFIX,
    FileEntry,
    Manifest,
    encode_manifest,
    sign_manifest,
)


def source_files(source: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """The root and ``(relative path, file)`` pairs of a safetensors file or a folder of them.

    A folder contributes every ``*.safetensors`` file below it (symlinked files followed,
    symlinked folders not); anything else in it is not part of the model."""
    if source.is_file():
        return source.parent, [(source.name, source)]
    if not source.is_dir():
        raise InvalidManifest(f"{source} is neither a file nor a folder")
    found = sorted(
        ((p.relative_to(source).as_posix(), p) for p in source.rglob("*" + SUFFIX) if p.is_file()),
        key=lambda item: item[0].encode("utf-8"),
    )
    if not found:
        raise InvalidManifest(f"{source} holds no {SUFFIX} files")
    return source, found


def describe_file(path: Path, rel: str, chunk_size: int) -> FileEntry:
    """Hash one file chunk by chunk and parse its header (blocking: run it in a thread)."""
    size = os.stat(path).st_size
    try:
        header = read_header(str(path), size)
    except InvalidSafetensors as exc:
        raise InvalidSafetensors(f"{path} is not a valid safetensors file: {exc}") from None
    whole = hashlib.sha256()
    chunks = []
    read = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).digest())
            read += len(block)
    if read != size:
        raise InvalidManifest(f"{path} changed size while it was read ({size} then {read} bytes)")
    return FileEntry(rel, size, whole.digest(), header.data_offset, tuple(chunks), header.tensors)


def normalize_metadata(value: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict, list-not-tuple copy of ``value`` (so a decoded manifest compares equal)."""

    def norm(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return v

    return norm(dict(value))  # type: ignore[no-any-return]


def build_manifest(
    source: Path,
    *,
    key: nacl.signing.SigningKey,
    name: str,
    version: str,
    description: str = "",
    license: str = "",
    tags: tuple[str, ...] | list[str] = (),
    metadata: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    created: int | None = None,
) -> Manifest:
    """Chunk, hash and describe a safetensors file or folder, and sign the manifest.

    Blocking (reads every byte once): call it through ``trio.to_thread.run_sync``. The files
    are then imported with ``ShardStore.import_files(manifest, source_files(source)[0])``."""
    if type(chunk_size) is not int or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidManifest(f"chunk size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size!r}")
    _, found = source_files(Path(source))
    if len(found) > MAX_FILES:
        raise InvalidManifest(f"{source} holds {len(found)} files, over the limit of {MAX_FILES}")
    files = tuple(describe_file(p, rel, chunk_size) for rel, p in found)
    m = Manifest(
        name=name,
        version=version,
        description=description,
        license=license,
        tags=tuple(sorted(set(tags))),
        metadata=normalize_metadata(metadata or {}),
        chunk_size=chunk_size,
        files=files,
        total_size=sum(f.size for f in files),
        publisher=bytes(key.verify_key),
        created=int(time.time()) if created is None else created,
    )
    signed = sign_manifest(key, m)
    encode_manifest(signed)  # refuse now what nobody could decode later (size limit)
    return signed

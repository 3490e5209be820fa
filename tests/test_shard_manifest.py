"""Manifests built from real safetensors files (written by safetensors.torch), their checks,
signatures, canonical codec and the registry helpers."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prsm_node.shards import (
    DEFAULT_CHUNK_SIZE,
    BadManifestSignature,
    InvalidManifest,
    InvalidSafetensors,
    Manifest,
    ShardDecodeError,
    TensorInfo,
    build_manifest,
    decode_manifest,
    encode_manifest,
    latest_version,
    manifest_id,
    name_key,
    parse_ref,
    validate_manifest,
    verify_manifest,
    version_key,
    version_order,
)
from prsm_node.shards.manifest import MANIFEST_DOMAIN, MAX_MANIFEST_SIZE, _fields, path_problem

KEY = nacl.signing.SigningKey(bytes([0x42]) * 32)
OTHER = nacl.signing.SigningKey(bytes([0x43]) * 32)
SMALL = 1024


def tensors_mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "w32": torch.randn(40, 13, generator=g),
        "w16": torch.randn(17, 5, generator=g).to(torch.float16),
        "wbf": torch.randn(33, generator=g).to(torch.bfloat16),
        "ids": torch.arange(-5, 20, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False, True]),
    }


def build(source: Path, **kwargs: Any) -> Manifest:
    params: dict[str, Any] = {"key": KEY, "name": "test/model", "version": "1.0", "created": 1_700_000_000}
    return build_manifest(source, **(params | kwargs))


def test_manifest_from_one_file_matches_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors_mixed(), path, metadata={"format": "pt"})
    m = build(path, chunk_size=SMALL, tags=["lm", "embedding", "lm"], metadata={"architecture": {"name": "x"}})
    verify_manifest(m)
    assert m.tags == ("embedding", "lm")
    (f,) = m.files
    data = path.read_bytes()
    assert f.path == "model.safetensors" and f.size == len(data) == m.total_size
    assert len(f.chunks) == math.ceil(len(data) / SMALL) == m.chunk_count > 1
    with safe_open(str(path), framework="pt") as st:
        assert {t.name for t in f.tensors} == set(st.keys())
        for t in f.tensors:
            tensor = st.get_tensor(t.name)
            assert list(t.shape) == list(tensor.shape)
            raw = data[t.begin : t.end]
            assert raw == tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else raw == b""
    dtypes = {t.name: t.dtype for t in f.tensors}
    assert dtypes == {"w32": "F32", "w16": "F16", "wbf": "BF16", "ids": "I64", "empty": "F32", "flag": "BOOL"}
    assert [t.begin for t in f.tensors] == sorted(t.begin for t in f.tensors)
    assert f.tensors[0].begin == f.data_offset and f.tensors[-1].end == f.size


def test_folder_of_two_files_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save_file({"b": torch.ones(300)}, tmp_path / "sub" / "part-2.safetensors")
    save_file({"a": torch.ones(100, dtype=torch.float16)}, tmp_path / "part-1.safetensors")
    (tmp_path / "config.json").write_text("{}")  # not part of the model
    m = build(tmp_path, chunk_size=SMALL)
    assert [f.path for f in m.files] == ["part-1.safetensors", "sub/part-2.safetensors"]
    assert m.total_size == sum(f.size for f in m.files)
    spans = list(m.chunk_spans())
    assert [s.index for s in spans] == list(range(m.chunk_count))
    assert [s.file_index for s in spans] == [0] * len(m.files[0].chunks) + [1] * len(m.files[1].chunks)
    assert sum(s.length for s in spans) == m.total_size
    assert m.first_chunk(1) == len(m.files[0].chunks)
    t = m.files[1].tensors[0]
    assert list(m.chunks_for_range(1, t.begin, t.end)) == [m.first_chunk(1) + i for i in range(2)]


def test_file_smaller_than_one_chunk(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "tiny.safetensors")
    m = build(tmp_path / "tiny.safetensors")
    assert m.chunk_size == DEFAULT_CHUNK_SIZE and m.chunk_count == 1
    assert decode_manifest(encode_manifest(m)) == m


def test_file_an_exact_multiple_of_the_chunk_size(tmp_path: Path) -> None:
    path = tmp_path / "exact.safetensors"
    n = 2048
    for _ in range(4):  # the header length depends a little on n
        save_file({"x": torch.zeros(n, dtype=torch.uint8)}, path)
        n += -path.stat().st_size % SMALL
    size = path.stat().st_size
    assert size % SMALL == 0
    m = build(path, chunk_size=SMALL)
    assert m.chunk_count == size // SMALL and all(s.length == SMALL for s in m.chunk_spans())


def test_the_chunks_of_a_valid_manifest_tile_every_file_exactly(tmp_path: Path) -> None:
    """What lets a fetch skip the whole-file hash: each file's chunk spans start at 0, each
    starts where the previous ended, none is empty or longer than the chunk size, the last
    ends at the file's size; a chunk count that could leave a gap or overlap is refused."""
    for n in (1, 250, 255, 256, 257, 700):
        folder = tmp_path / f"m{n}"
        folder.mkdir()
        save_file({"x": torch.zeros(n, dtype=torch.int32)}, folder / "a.safetensors")
        save_file({"y": torch.ones(3 * n, dtype=torch.uint8)}, folder / "b.safetensors")
        m = build(folder, chunk_size=SMALL)
        spans = list(m.chunk_spans())
        for file_index, f in enumerate(m.files):
            mine = [s for s in spans if s.file_index == file_index]
            assert [s.hash for s in mine] == list(f.chunks)
            assert mine[0].offset == 0 and mine[-1].offset + mine[-1].length == f.size
            assert all(a.offset + a.length == b.offset for a, b in zip(mine, mine[1:], strict=False))
            assert all(1 <= s.length <= m.chunk_size for s in mine)
        f = m.files[0]
        for chunks in (f.chunks[:-1], (*f.chunks, f.chunks[-1])):
            with pytest.raises(InvalidManifest, match="chunk hashes"):
                validate_manifest(dataclasses.replace(m, files=(dataclasses.replace(f, chunks=chunks), m.files[1])))


def test_only_empty_tensors(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(0), "b": torch.zeros(3, 0, dtype=torch.int64)}, tmp_path / "e.safetensors")
    m = build(tmp_path / "e.safetensors", chunk_size=SMALL)
    (f,) = m.files
    assert all(t.begin == t.end == f.size for t in f.tensors) and [t.name for t in f.tensors] == ["a", "b"]
    assert decode_manifest(encode_manifest(m)) == m


def test_id_is_the_hash_of_the_signed_encoding(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    m = build(tmp_path)
    again = build(tmp_path)
    assert manifest_id(m) == manifest_id(again)  # Ed25519 is deterministic
    other = build(tmp_path, key=OTHER)
    assert other.publisher == bytes(OTHER.verify_key) and manifest_id(other) != manifest_id(m)
    assert manifest_id(build(tmp_path, created=1)) != manifest_id(m)


def test_bad_signature_rejected(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    m = build(tmp_path)
    for bad in (
        dataclasses.replace(m, signature=bytes(64)),
        dataclasses.replace(m, version="1.1"),
        dataclasses.replace(m, publisher=bytes(OTHER.verify_key)),
        dataclasses.replace(m, metadata={"x": 1}),
    ):
        decode_manifest(encode_manifest(bad))  # well-formed...
        with pytest.raises(BadManifestSignature):
            verify_manifest(bad)  # ...but not what the publisher signed


def test_tampered_tensor_table_rejected(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4), "b": torch.ones(2, 2)}, tmp_path / "m.safetensors")
    m = build(tmp_path)
    f = m.files[0]
    a, b = f.tensors
    renamed = (dataclasses.replace(a, name="c"), b)  # consistent, but not signed
    with pytest.raises(BadManifestSignature):
        verify_manifest(dataclasses.replace(m, files=(dataclasses.replace(f, tensors=renamed),)))
    reshaped = (dataclasses.replace(a, shape=(2, 2)), b)
    with pytest.raises(BadManifestSignature):
        verify_manifest(dataclasses.replace(m, files=(dataclasses.replace(f, tensors=reshaped),)))
    for broken in (
        (dataclasses.replace(a, shape=(5,)), b),  # shape does not match the bytes
        (dataclasses.replace(a, dtype="F4"), b),  # unknown dtype
        (a, dataclasses.replace(b, begin=b.begin - 4, end=b.end - 4)),  # overlap and a hole at the end
        (b, a),  # not in order
        (a,),  # a hole
        (a, dataclasses.replace(b, name="a")),  # a name twice
    ):
        bad = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(f, tensors=broken),)))
        with pytest.raises(InvalidManifest):
            verify_manifest(bad)
        with pytest.raises(ShardDecodeError):
            decode_manifest(_force_encode(bad))


def _force_encode(m: Manifest) -> bytes:
    """The bytes an encoder without checks would write (what a hostile peer can send)."""
    return msgpack.packb([*_fields(m), m.signature], use_bin_type=True)  # type: ignore[no-any-return]


def _force_sign(m: Manifest) -> Manifest:
    """``m`` validly signed however broken it is (a hostile publisher)."""
    payload = msgpack.packb([MANIFEST_DOMAIN, *_fields(m)], use_bin_type=True)
    return dataclasses.replace(m, signature=KEY.sign(payload).signature)


def test_inconsistent_files_rejected(tmp_path: Path) -> None:
    save_file({"a": torch.ones(400)}, tmp_path / "m.safetensors")
    m = build(tmp_path, chunk_size=SMALL)
    f = m.files[0]
    for bad_file in (
        dataclasses.replace(f, chunks=f.chunks[:-1]),
        dataclasses.replace(f, chunks=(*f.chunks, f.chunks[0])),
        dataclasses.replace(f, chunks=(f.chunks[0][:31], *f.chunks[1:])),
        dataclasses.replace(f, sha256=b"x"),
        dataclasses.replace(f, size=f.size + 1),
        dataclasses.replace(f, data_offset=f.data_offset + 8),
    ):
        with pytest.raises(InvalidManifest):
            validate_manifest(dataclasses.replace(m, files=(bad_file,)))
    for bad in (
        dataclasses.replace(m, total_size=m.total_size + 1),
        dataclasses.replace(m, chunk_size=SMALL * 2),
        dataclasses.replace(m, chunk_size=SMALL + 1),
        dataclasses.replace(m, files=()),
        dataclasses.replace(m, files=(f, f)),
        dataclasses.replace(m, format=2),
        dataclasses.replace(m, created=-1),
        dataclasses.replace(m, signature=b"short"),
    ):
        with pytest.raises(InvalidManifest):
            encode_manifest(bad)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs.safetensors",
        "../up.safetensors",
        "a/../b.safetensors",
        "./a.safetensors",
        "a//b.safetensors",
        "a\\b.safetensors",
        "c:x.safetensors",
        "a\x00.safetensors",
        "a\n.safetensors",
        "model.bin",
        ".safetensors",
        "dir/.safetensors",
        "x" * 250 + ".safetensors",
    ],
)
def test_bad_paths(tmp_path: Path, path: str) -> None:
    assert path_problem(path) is not None
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    m = build(tmp_path)
    bad = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(m.files[0], path=path),)))
    with pytest.raises(InvalidManifest):
        encode_manifest(bad)
    with pytest.raises(ShardDecodeError):
        decode_manifest(_force_encode(bad))


def test_paths_unique_sorted_and_not_nested(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    m = build(tmp_path)
    f = m.files[0]
    for paths in (
        ["b.safetensors", "a.safetensors"],
        ["a.safetensors", "a.safetensors"],
        ["A.safetensors", "a.safetensors"],
        ["a.safetensors", "a.safetensors/b.safetensors"],
    ):
        files = tuple(dataclasses.replace(f, path=p) for p in paths)
        with pytest.raises(InvalidManifest):
            encode_manifest(dataclasses.replace(m, files=files, total_size=2 * f.size))
    ok = tuple(dataclasses.replace(f, path=p) for p in ["a/b.safetensors", "a/c.safetensors", "ab.safetensors"])
    encode_manifest(dataclasses.replace(m, files=ok, total_size=3 * f.size))


def test_fields_and_limits(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    m = build(tmp_path)
    good_meta = {"a": [1, -2, True, "s", 1.5, {"b": []}], "big": 2**64 - 1, "neg": -(2**63)}
    assert decode_manifest(encode_manifest(dataclasses.replace(m, metadata=good_meta))).metadata == good_meta
    bad_changes: list[dict[str, Any]] = [
        {"name": ""},
        {"name": "a:b"},
        {"name": "a/b/c"},
        {"name": "x" * 129},
        {"name": "-lead"},
        {"version": ""},
        {"version": "1:2"},
        {"version": "v" * 65},
        {"description": "d" * 4097},
        {"license": "l" * 65},
        {"tags": ("LM",)},
        {"tags": ("b", "a")},
        {"tags": ("a", "a")},
        {"tags": tuple(f"t{i:02}" for i in range(33))},
        {"tags": ("x" * 33,)},
        {"tags": ["lm"]},
        {"metadata": {"x": None}},
        {"metadata": {"x": float("nan")}},
        {"metadata": {"x": float("inf")}},
        {"metadata": {"x": b"bytes"}},
        {"metadata": {"x": (1, 2)}},
        {"metadata": {1: "int key"}},
        {"metadata": {"": "empty key"}},
        {"metadata": {"x": 2**64}},
        {"metadata": {"x": -(2**63) - 1}},
        {"metadata": {"x": "\ud800"}},
        {"metadata": {"x": "y" * 70_000}},
        {"metadata": _nested(9)},
        {"metadata": []},
        {"publisher": bytes(31)},
    ]
    for changes in bad_changes:
        with pytest.raises(InvalidManifest):
            encode_manifest(dataclasses.replace(m, **changes))
    encode_manifest(dataclasses.replace(m, metadata=_nested(8)))


def _nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return {"x": value}


def test_build_normalizes_metadata_and_rejects_bad_sources(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    m = build(tmp_path, metadata={"b": (1, 2), "a": {"z": 1, "y": (True,)}})
    assert m.metadata == {"a": {"y": [True], "z": 1}, "b": [1, 2]}
    assert decode_manifest(encode_manifest(m)) == m
    with pytest.raises(InvalidManifest):
        build(tmp_path / "missing")
    with pytest.raises(InvalidManifest):
        build(tmp_path, chunk_size=512)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidManifest):
        build(empty)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InvalidSafetensors, match=r"junk\.safetensors is not a valid safetensors file: header"):
        build(tmp_path)  # the error names the file (a folder may hold many)


def test_decode_rejects_garbage_and_oversize(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    data = encode_manifest(build(tmp_path))
    for bad in (b"", b"\xc1", data + b"\x00", data[:-1], msgpack.packb([]), b"\x00" * (MAX_MANIFEST_SIZE + 1)):
        with pytest.raises(ShardDecodeError):
            decode_manifest(bad)
    # bin written as str (an old msgpack habit) is not the canonical form
    legacy = msgpack.packb(msgpack.unpackb(data), use_bin_type=False)
    with pytest.raises(ShardDecodeError):
        decode_manifest(legacy)


def test_tensor_info_is_exported_type(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    assert isinstance(build(tmp_path).files[0].tensors[0], TensorInfo)


# ------------------------------------------------------------ registry


def test_registry_keys_and_refs() -> None:
    assert name_key("org/model") != name_key("org/Model")  # case-sensitive, exact
    assert version_key("a", "1.0") != version_key("a", "1.0.0")
    assert len(name_key("a")) == len(version_key("a", "1")) == 32
    assert parse_ref("org/model:1.2") == ("org/model", "1.2")
    assert parse_ref("org/model") == ("org/model", None)
    for bad in ("", "a:b:c", "a:", ":1", "a b"):
        with pytest.raises(InvalidManifest):
            parse_ref(bad)


def test_version_order() -> None:
    versions = ["1.10", "1.9", "1.2.0", "1.2", "2.0-rc1", "beta", "alpha", "10", "0"]
    assert sorted(versions, key=version_order) == ["2.0-rc1", "alpha", "beta", "0", "1.2", "1.2.0", "1.9", "1.10", "10"]
    assert latest_version(versions) == "10"
    assert latest_version(["1.0-rc1", "0.1"]) == "0.1"
    assert latest_version(["b", "a"]) == "b"
    assert latest_version([]) is None


def test_importing_shards_does_not_import_torch() -> None:
    code = "import sys, prsm_node.shards; print([m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

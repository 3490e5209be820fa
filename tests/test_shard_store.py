"""The chunk and manifest store: verified writes and reads, resume, assembly into files that
torch loads, removal that keeps shared chunks, the quota."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import nacl.signing
import pytest
import torch
from safetensors.torch import load_file, save_file

from prsm_node.shards import (
    ChunkHashMismatch,
    ChunkNotFound,
    CorruptChunk,
    FileHashMismatch,
    InvalidRange,
    Manifest,
    ManifestNotFound,
    MissingChunks,
    QuotaExceeded,
    ShardDecodeError,
    ShardStore,
    TensorTableMismatch,
    UnsafePath,
    build_manifest,
    encode_manifest,
    manifest_id,
)
from prsm_node.shards.manifest import MANIFEST_DOMAIN, _fields

KEY = nacl.signing.SigningKey(bytes([0x21]) * 32)
CHUNK = 1024


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(50, 16, generator=g),
        "norm": torch.randn(16, generator=g).to(torch.bfloat16),
        "proj": torch.randn(16, 9, generator=g).to(torch.float16),
        "pos": torch.arange(40, dtype=torch.int64),
        "none": torch.zeros(0, 2),
    }


def make_model(root: Path, name: str, files: dict[str, dict[str, torch.Tensor]]) -> tuple[Path, Manifest]:
    folder = root / name
    for rel, tensors in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / rel)
    m = build_manifest(folder, key=KEY, name=name, version="1", chunk_size=CHUNK, created=1)
    return folder, m


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Manifest]:
    return make_model(tmp_path, "alpha", {"a.safetensors": weights(1), "sub/b.safetensors": {"w": torch.ones(300)}})


def chunk_data(folder: Path, m: Manifest) -> list[bytes]:
    out = []
    for f in m.files:
        data = (folder / f.path).read_bytes()
        out += [data[i : i + m.chunk_size] for i in range(0, f.size, m.chunk_size)]
    return out


def test_put_get_has_and_read_range(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "data")
    data = os.urandom(3000)
    h = hashlib.sha256(data).digest()
    assert not store.has(h)
    assert store.put_chunk(h, data) is True
    assert store.put_chunk(h, data) is False  # already held: not written or charged twice
    assert store.has(h) and store.get_chunk(h) == data and store.usage() == 3000
    path = store.chunk_path(h)
    assert path.relative_to(store.chunks_dir).parts == (h.hex()[:2], h.hex()[2:4], h.hex())
    assert store.read_range(h, 10, 20) == data[10:30]
    assert store.read_range(h, 3000, 0) == b""
    for offset, length in ((-1, 2), (0, 3001), (2999, 2), (0, -1)):
        with pytest.raises(InvalidRange):
            store.read_range(h, offset, length)
    missing = hashlib.sha256(b"nope").digest()
    with pytest.raises(ChunkNotFound):
        store.get_chunk(missing)
    with pytest.raises(ChunkNotFound):
        store.read_range(missing, 0, 1)
    with pytest.raises(ValueError):
        store.has(b"short")


def test_corrupt_chunk_refused_on_write(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "data")
    data = b"x" * 100
    with pytest.raises(ChunkHashMismatch):
        store.put_chunk(hashlib.sha256(b"y" * 100).digest(), data)
    assert store.statistics().chunks == 0 and store.usage() == 0
    assert list(store.tmp_dir.iterdir()) == []


def test_chunk_corrupted_on_disk_detected_on_verified_read(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "data")
    data = b"payload" * 100
    h = hashlib.sha256(data).digest()
    store.put_chunk(h, data)
    path = store.chunk_path(h)
    path.chmod(0o600)
    path.write_bytes(b"P" + data[1:])
    assert store.get_chunk(h, verify=False) == b"P" + data[1:]
    with pytest.raises(CorruptChunk):
        store.get_chunk(h)
    assert not store.has(h) and store.usage() == 0  # deleted: it will be fetched again
    assert store.put_chunk(h, data) and store.get_chunk(h) == data


def test_resume_missing_shrinks_and_survives_reopen(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    mid, decoded = store.put_manifest(encode_manifest(m))
    assert mid == manifest_id(m) and decoded == m and store.get_manifest(mid) == m
    chunks = chunk_data(folder, m)
    assert store.missing(m) == list(range(m.chunk_count)) and m.chunk_count > 4
    for i in (0, 3, 1):
        store.put_chunk(m.chunk_hashes()[i], chunks[i])
    assert store.missing(m) == [i for i in range(m.chunk_count) if i not in (0, 1, 3)]
    # a restart: the state is derived from the chunk files, nothing is fetched twice
    (store.tmp_dir / "tmpleftover").write_bytes(b"half a chunk")
    reopened = ShardStore(tmp_path / "data")
    assert list(reopened.tmp_dir.iterdir()) == []
    assert reopened.usage() == store.usage()
    assert reopened.manifest_ids() == [mid] and reopened.get_manifest(mid) == m
    before = reopened.missing(m)
    for i in before:
        assert reopened.put_chunk(m.chunk_hashes()[i], chunks[i]) is True
        assert reopened.missing(m) == [j for j in before if j > i]
    assert reopened.is_complete(m) and reopened.verify_model(m) == []
    assert reopened.present(m) == [True] * m.chunk_count


def test_assemble_gives_identical_files_that_torch_loads(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    store.add_manifest(m)
    assert store.import_files(m, folder) == len(set(m.chunk_hashes()))
    out = store.assemble(m, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in out] == [f.path for f in m.files]
    for f, path in zip(m.files, out, strict=True):
        assert path.read_bytes() == (folder / f.path).read_bytes()
        loaded, original = load_file(path), load_file(folder / f.path)
        assert loaded.keys() == original.keys()
        for k in original:
            assert loaded[k].dtype == original[k].dtype and torch.equal(loaded[k], original[k])
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".partial")]
    again = store.assemble(m, tmp_path / "out")  # overwriting is fine
    assert again == out


def test_assemble_needs_every_chunk(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    store.import_files(m, folder)
    victim = m.chunk_hashes()[2]
    store.chunk_path(victim).unlink()
    with pytest.raises(MissingChunks) as info:
        store.assemble(m, tmp_path / "out")
    assert info.value.missing == [i for i, h in enumerate(m.chunk_hashes()) if h == victim]
    assert not (tmp_path / "out" / "a.safetensors").exists()


def test_assemble_checks_file_hash_and_tensor_table(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    store.import_files(m, folder)
    f = m.files[0]
    bad_hash = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(f, sha256=bytes(32)), m.files[1])))
    with pytest.raises(FileHashMismatch):
        store.assemble(bad_hash, tmp_path / "out")
    # a publisher that signs a table which tiles the file but is not its header
    t = f.tensors
    swapped = (*t[:-2], dataclasses.replace(t[-2], name=t[-1].name), dataclasses.replace(t[-1], name=t[-2].name))
    lying = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(f, tensors=swapped), m.files[1])))
    with pytest.raises(TensorTableMismatch):
        store.assemble(lying, tmp_path / "out2")
    assert not list((tmp_path / "out2").rglob("*.safetensors"))
    assert not [p for p in (tmp_path / "out2").rglob("*") if p.name.endswith(".partial")]


def _force_sign(m: Manifest) -> Manifest:
    payload = msgpack.packb([MANIFEST_DOMAIN, *_fields(m)], use_bin_type=True)
    return dataclasses.replace(m, signature=KEY.sign(payload).signature)


def test_assemble_refuses_a_symlink_out_of_dest(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    store.import_files(m, folder)
    dest = tmp_path / "out"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath):
        store.assemble(m, dest)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_import_refuses_changed_files(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    path = folder / "sub" / "b.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkHashMismatch):
        store.import_files(m, folder)
    path.write_bytes(bytes(data) + b"x")
    data[-1] ^= 1
    path.write_bytes(bytes(data) + b"x")
    with pytest.raises(ChunkHashMismatch):
        store.import_files(m, folder)


def test_remove_keeps_shared_chunks(tmp_path: Path) -> None:
    shared = weights(5)
    a_folder, a = make_model(tmp_path, "a", {"common.safetensors": shared, "only-a.safetensors": weights(6)})
    b_folder, b = make_model(tmp_path, "b", {"common.safetensors": shared, "only-b.safetensors": {"x": torch.ones(9)}})
    store = ShardStore(tmp_path / "data")
    for folder, m in ((a_folder, a), (b_folder, b)):
        store.add_manifest(m)
        store.import_files(m, folder)
    common = set(a.files[0].chunks)
    assert common == set(b.files[0].chunks)
    usage = store.usage()
    freed = store.remove(manifest_id(a))
    assert freed > 0 and store.usage() == usage - freed
    assert not store.has_manifest(manifest_id(a))
    assert all(store.has(h) for h in common) and store.is_complete(b)
    assert not any(store.has(h) for h in set(a.files[1].chunks) - common)
    store.assemble(b, tmp_path / "out")
    with pytest.raises(ManifestNotFound):
        store.remove(manifest_id(a))
    store.remove(manifest_id(b))
    assert store.usage() == 0 and store.statistics().chunks == 0 and store.manifest_ids() == []


def test_collect_garbage_drops_unpinned_chunks(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    store.add_manifest(m)
    store.import_files(m, folder)
    stray = b"not in any manifest"
    store.put_chunk(hashlib.sha256(stray).digest(), stray)
    assert store.collect_garbage() == len(stray)
    assert store.is_complete(m)


def test_quota(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    manifest_bytes = encode_manifest(m)
    store = ShardStore(tmp_path / "data", quota=len(manifest_bytes) + 3 * CHUNK)
    store.put_manifest(manifest_bytes)
    chunks = chunk_data(folder, m)
    for i in range(3):
        store.put_chunk(m.chunk_hashes()[i], chunks[i])
    used = store.usage()
    assert used == len(manifest_bytes) + 3 * CHUNK
    with pytest.raises(QuotaExceeded) as info:
        store.put_chunk(m.chunk_hashes()[3], chunks[3])
    assert (info.value.needed, info.value.usage, info.value.quota) == (CHUNK, used, store.quota)
    assert store.usage() == used and not store.has(m.chunk_hashes()[3])
    assert store.put_chunk(m.chunk_hashes()[0], chunks[0]) is False  # already held: no charge, no error
    with pytest.raises(QuotaExceeded):
        store.import_files(m, folder)
    assert ShardStore(tmp_path / "data", quota=0).usage() == used
    with pytest.raises(ValueError):
        ShardStore(tmp_path / "data", quota=-1)


def test_manifest_storage_checks(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    _, m = model
    store = ShardStore(tmp_path / "data")
    data = encode_manifest(m)
    with pytest.raises(ShardDecodeError):
        store.put_manifest(data[:-1])
    with pytest.raises(ManifestNotFound):
        store.get_manifest(manifest_id(m))
    mid, _ = store.put_manifest(data)
    assert store.put_manifest(data)[0] == mid and store.usage() == len(data)
    assert store.get_manifest_bytes(mid) == data
    path = store.manifests_dir / mid.hex()
    path.chmod(0o600)
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(ShardDecodeError):
        ShardStore(tmp_path / "data").get_manifest(mid)


def test_concurrent_puts_of_one_chunk_are_charged_once(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "data")
    blobs = [os.urandom(2048) for _ in range(8)]
    jobs = [b for b in blobs for _ in range(6)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda d: store.put_chunk(hashlib.sha256(d).digest(), d), jobs))
    assert sum(results) == len(blobs)
    assert store.usage() == sum(len(b) for b in blobs) == ShardStore(tmp_path / "data").usage()
    assert store.statistics().chunks == len(blobs) == ShardStore(tmp_path / "data").statistics().chunks
    assert list(store.tmp_dir.iterdir()) == []


def test_a_copied_store_is_usable(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store = ShardStore(tmp_path / "data")
    store.add_manifest(m)
    store.import_files(m, folder)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    copy = ShardStore(tmp_path / "copy")
    assert copy.usage() == store.usage() and copy.is_complete(copy.get_manifest(manifest_id(m)))


def test_an_assembly_writes_chunks_in_any_order_and_checks_the_files(tmp_path: Path) -> None:
    from prsm_node.shards import FileHashMismatch

    store, m = _assembly_model(tmp_path)
    spans = list(m.chunk_spans())
    asm = store.open_assembly(m, tmp_path / "out")
    for span in reversed(spans[1:]):  # out of order; chunk 0 comes from the store at finish()
        asm.write(span.index, store.get_chunk(span.hash))
    paths = asm.finish()
    assert [p.read_bytes() for p in paths] == [(tmp_path / "src" / f.path).read_bytes() for f in m.files]

    broken = store.open_assembly(m, tmp_path / "bad")
    data = bytearray(store.get_chunk(spans[0].hash))
    data[-1] ^= 1
    broken.write(0, bytes(data))  # the caller's duty is to verify first; the file hash still catches it
    with pytest.raises(FileHashMismatch):
        broken.finish()
    broken.abort()
    assert not (tmp_path / "bad").exists()  # no partial file, no empty folder left


def _assembly_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    import nacl.signing
    import numpy as np
    from safetensors.numpy import save_file

    from prsm_node.shards import build_manifest, source_files

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    save_file({"a": rng.standard_normal((64, 64), dtype=np.float32)}, str(src / "model.safetensors"))
    save_file({"b": rng.standard_normal((40, 40), dtype=np.float32)}, str(src / "sub" / "head.safetensors"))
    m = build_manifest(src, key=nacl.signing.SigningKey(b"\x01" * 32), name="t/asm", version="1", chunk_size=4096)
    store = ShardStore(tmp_path / "data")
    store.add_manifest(m)
    store.import_files(m, source_files(src)[0])
    return store, m

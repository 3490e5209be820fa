"""The model store: every byte written once into the model's files, a verified-chunk record
that never gets ahead of the data (resume after a clean stop or a crash), reads that detect a
file changed on disk, files that torch loads, removal, the quota."""

from __future__ import annotations

import dataclasses
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
    Manifest,
    ManifestNotFound,
    MissingChunks,
    ModelBusy,
    QuotaExceeded,
    ShardDecodeError,
    ShardStore,
    TensorTableMismatch,
    UnsafePath,
    build_manifest,
    encode_manifest,
    manifest_id,
)
from prsm_node.shards import assembly as assembly_module
from prsm_node.shards import store as store_module
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


def stored(tmp_path: Path, m: Manifest, **kw: object) -> tuple[ShardStore, bytes]:
    store = ShardStore(tmp_path / "data", **kw)  # type: ignore[arg-type]
    return store, store.add_manifest(m)


def test_publishing_copies_the_files_once_and_serves_chunks_from_them(
        tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    assert store.models_dir == tmp_path / "models"
    assert store.import_files(m, folder) == m.chunk_count > 4
    assert store.is_complete(mid) and store.is_complete(m) and store.missing(mid) == []
    paths = store.files(mid)
    assert paths == [tmp_path / "models" / mid.hex() / f.path for f in m.files]
    for f, path in zip(m.files, paths, strict=True):
        assert path.read_bytes() == (folder / f.path).read_bytes()
        loaded, original = load_file(path), load_file(folder / f.path)
        assert loaded.keys() == original.keys()
        for k in original:
            assert loaded[k].dtype == original[k].dtype and torch.equal(loaded[k], original[k])
    # the bytes are on disk once: the model's files, nothing else of that size
    others = [p for p in tmp_path.joinpath("data").rglob("*") if p.is_file() and p.stat().st_size > 4 * CHUNK]
    assert others == []
    assert [store.read_chunk(mid, i) for i in range(m.chunk_count)] == chunk_data(folder, m)
    with pytest.raises(ChunkNotFound):
        store.read_chunk(mid, m.chunk_count)
    assert store.import_files(m, folder) == 0  # complete already: nothing written
    assert store.usage() == len(encode_manifest(m)) + m.total_size
    assert store.statistics().chunks == m.chunk_count
    assert not list(store.models_dir.glob("*.partial"))


def test_chunks_in_any_order_resume_after_a_stop_and_the_folder_appears_when_complete(
        tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    chunks = chunk_data(folder, m)
    first = [5, 0, 3, 1]
    asm = store.open_assembly(m)
    with pytest.raises(ModelBusy):
        store.open_assembly(m)
    for i in first:
        asm.write(i, chunks[i])
    assert store.missing(mid) == list(range(m.chunk_count))  # recorded only once flushed
    asm.close()
    assert store.missing(mid) == [i for i in range(m.chunk_count) if i not in first]
    assert not store.model_dir(mid).exists() and store.partial_dir(mid).is_dir()

    reopened = ShardStore(tmp_path / "data")  # a restart: the record survives, nothing is fetched twice
    assert reopened.present(mid) == store.present(mid) and reopened.usage() == store.usage()
    assert reopened.statistics().chunks == len(first)
    asm = reopened.open_assembly(reopened.get_manifest(mid))
    for i in reversed(reopened.missing(mid)):
        asm.write(i, chunks[i])
    paths = asm.finish()
    asm.close()
    assert [p.read_bytes() for p in paths] == [(folder / f.path).read_bytes() for f in m.files]
    assert reopened.is_complete(mid) and not reopened.partial_dir(mid).exists()
    assert ShardStore(tmp_path / "data").is_complete(mid)


def test_a_crash_never_leaves_a_chunk_recorded_before_its_bytes_were_flushed(
        tmp_path: Path, model: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    chunks = chunk_data(folder, m)
    monkeypatch.setattr(assembly_module, "SYNC_EVERY", 3 * CHUNK)
    asm = store.open_assembly(m)
    for i in (0, 1):
        asm.write(i, chunks[i])
    # "crash" now: another process opening the store sees no record at all
    assert ShardStore(tmp_path / "data").missing(mid) == list(range(m.chunk_count))
    assert not asm.flush_due
    asm.write(2, chunks[2])  # 3 chunks written: a flush is due; the files are synced, then recorded
    assert asm.flush_due and ShardStore(tmp_path / "data").missing(mid) == list(range(m.chunk_count))
    asm.flush()
    assert not asm.flush_due and ShardStore(tmp_path / "data").missing(mid) == list(range(3, m.chunk_count))
    asm.write(3, chunks[3])
    assert ShardStore(tmp_path / "data").missing(mid) == list(range(3, m.chunk_count))
    asm.close()
    assert ShardStore(tmp_path / "data").missing(mid) == list(range(4, m.chunk_count))


def test_a_damaged_record_is_not_trusted(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    store.import_files(m, folder)
    record = store.have_dir / mid.hex()
    data = bytearray(record.read_bytes())
    data[-9] ^= 0x01  # one bit of the bitmap: the checksum no longer matches
    record.write_bytes(bytes(data))
    reopened = ShardStore(tmp_path / "data")
    assert reopened.missing(mid) == list(range(m.chunk_count)) and not reopened.is_complete(mid)
    record.write_bytes(b"")
    assert ShardStore(tmp_path / "data").missing(mid) == list(range(m.chunk_count))


def test_a_file_changed_on_disk_is_detected_reported_and_repaired_in_place(
        tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    store.import_files(m, folder)
    path = store.files(mid)[0]
    data = bytearray(path.read_bytes())
    data[CHUNK + 7] ^= 0xFF  # inside chunk 1
    path.write_bytes(bytes(data))
    assert store.read_chunk(mid, 0) == chunk_data(folder, m)[0]
    with pytest.raises(CorruptChunk, match=r"chunk 1 \(a.safetensors bytes \[1024, 2048\)\)"):
        store.read_chunk(mid, 1)
    with pytest.raises(ChunkNotFound):  # no longer served
        store.read_chunk(mid, 1)
    assert store.missing(mid) == [1] and not store.is_complete(mid)
    assert ShardStore(tmp_path / "data").missing(mid) == [1]  # the record was updated on disk
    assert store.verify_model(mid) == [1]

    asm = store.open_assembly(m)  # fetching again writes the one chunk into the complete folder
    asm.write(1, chunk_data(folder, m)[1])
    asm.finish()
    asm.close()
    assert store.is_complete(mid) and path.read_bytes() == (folder / "a.safetensors").read_bytes()

    path.unlink()
    with pytest.raises(CorruptChunk, match="missing"):
        store.read_chunk(mid, 0)
    assert store.missing(mid) == list(range(m.first_chunk(1)))


def test_a_settled_file_is_hashed_once_and_a_change_is_still_seen(
        tmp_path: Path, model: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    store.import_files(m, folder)
    path = store.files(mid)[0]
    assert store.read_chunk(mid, 1) == chunk_data(folder, m)[1]
    assert (mid, 1) not in store._hashed  # just written: not settled, hashed on every read
    monkeypatch.setattr(store_module, "SETTLED", -3600.0)  # from now on every file counts as settled
    assert store.read_chunk(mid, 1) == chunk_data(folder, m)[1]
    assert (mid, 1) in store._hashed  # hashed once; the next read of the unchanged file skips it
    mtime = path.stat().st_mtime_ns
    data = bytearray(path.read_bytes())
    data[CHUNK + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # an edit, seen in the file's metadata
    with pytest.raises(CorruptChunk):
        store.read_chunk(mid, 1)
    assert (mid, 1) not in store._hashed


def test_finishing_re_verifies_what_an_earlier_run_wrote(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    chunks = chunk_data(folder, m)
    asm = store.open_assembly(m)
    for i in range(0, m.chunk_count, 2):
        asm.write(i, chunks[i])
    asm.close()
    part = store.partial_dir(mid) / m.files[0].path
    data = bytearray(part.read_bytes())
    data[2 * CHUNK] ^= 1  # chunk 2, recorded as verified, damaged while the node was down
    part.write_bytes(bytes(data))

    asm = store.open_assembly(m)
    for i in store.missing(mid):
        asm.write(i, chunks[i])
    with pytest.raises(MissingChunks) as info:
        asm.finish()
    assert info.value.missing == [2] and not store.present(mid)[2]  # out of the record
    asm.write(2, chunks[2])
    paths = asm.finish()
    asm.close()
    assert [p.read_bytes() for p in paths] == [(folder / f.path).read_bytes() for f in m.files]

    other = store.add_manifest(make_model(tmp_path, "other", {"x.safetensors": weights(2)})[1])
    with pytest.raises(MissingChunks):  # nothing of it here: no files to load
        store.files(other)


def _force_sign(m: Manifest) -> Manifest:
    payload = msgpack.packb([MANIFEST_DOMAIN, *_fields(m)], use_bin_type=True)
    return dataclasses.replace(m, signature=KEY.sign(payload).signature)


def test_finishing_checks_file_hash_and_tensor_table(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    f = m.files[0]
    bad_hash = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(f, sha256=bytes(32)), m.files[1])))
    store, mid = stored(tmp_path, bad_hash)
    with pytest.raises(FileHashMismatch):
        store.import_files(bad_hash, folder)
    assert not store.model_dir(mid).exists()
    # a publisher that signs a table which tiles the file but is not its header
    t = f.tensors
    swapped = (*t[:-2], dataclasses.replace(t[-2], name=t[-1].name), dataclasses.replace(t[-1], name=t[-2].name))
    lying = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(f, tensors=swapped), m.files[1])))
    lying_id = store.add_manifest(lying)
    with pytest.raises(TensorTableMismatch):
        store.import_files(lying, folder)
    assert not store.model_dir(lying_id).exists()


def test_a_file_assembled_from_verified_chunks_is_not_hashed_again(
        tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    """A fetch writes only chunks it verified against the manifest, and the chunks tile each
    file, so finishing does not hash whole files (protocols/shard.md, Decoding and
    verification): a manifest whose file hash lies assembles from its chunks (a publish of it
    is refused, above); its tensor table is still checked."""
    folder, m = model
    f = m.files[0]
    bad_hash = _force_sign(dataclasses.replace(m, files=(dataclasses.replace(f, sha256=bytes(32)), m.files[1])))
    store, mid = stored(tmp_path, bad_hash)
    asm = store.open_assembly(bad_hash)
    for i, data in enumerate(chunk_data(folder, bad_hash)):
        asm.write(i, data)
    paths = asm.finish()
    asm.close()
    assert [p.read_bytes() for p in paths] == [(folder / g.path).read_bytes() for g in m.files]


def test_a_symlink_out_of_the_model_folder_is_refused(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    _, m = model
    store, mid = stored(tmp_path, m)
    store.partial_dir(mid).mkdir()
    (tmp_path / "elsewhere").mkdir()
    (store.partial_dir(mid) / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath):
        store.open_assembly(m)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_import_refuses_changed_files(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    path = folder / "sub" / "b.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkHashMismatch):
        store.import_files(m, folder)
    data[-1] ^= 1
    path.write_bytes(bytes(data) + b"x")
    with pytest.raises(ChunkHashMismatch):
        store.import_files(m, folder)
    assert not store.is_complete(mid)


def test_quota_remove_and_garbage(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    manifest_bytes = encode_manifest(m)
    store = ShardStore(tmp_path / "data", quota=len(manifest_bytes) + m.total_size - 1)
    mid, _ = store.put_manifest(manifest_bytes)
    with pytest.raises(QuotaExceeded) as info:
        store.open_assembly(m)  # the whole model is reserved up front
    assert (info.value.needed, info.value.usage) == (m.total_size, len(manifest_bytes))
    assert store.usage() == len(manifest_bytes) and list(store.models_dir.iterdir()) == []
    with pytest.raises(ValueError):
        ShardStore(tmp_path / "data", quota=-1)

    store = ShardStore(tmp_path / "data")
    store.import_files(m, folder)
    asm = store.open_assembly(m)
    with pytest.raises(ModelBusy):
        store.remove(mid)
    asm.close()
    assert store.remove(mid) == len(manifest_bytes) + m.total_size
    assert store.usage() == 0 and list(store.models_dir.iterdir()) == [] and store.manifest_ids() == []
    assert store.statistics().chunks == 0 and list(store.have_dir.iterdir()) == []
    with pytest.raises(ManifestNotFound):
        store.remove(mid)

    stray = store.models_dir / ("ab" * 32 + ".partial")
    stray.mkdir()
    (stray / "x.safetensors").write_bytes(b"x" * 100)
    assert ShardStore(tmp_path / "data").collect_garbage() == 100 and not stray.exists()


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


def test_concurrent_writers_and_a_copied_store(tmp_path: Path, model: tuple[Path, Manifest]) -> None:
    folder, m = model
    store, mid = stored(tmp_path, m)
    chunks = chunk_data(folder, m)
    asm = store.open_assembly(m)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: asm.write(i, chunks[i]), reversed(range(m.chunk_count))))
    asm.finish()
    asm.close()
    assert store.is_complete(mid)
    shutil.copytree(tmp_path / "data", tmp_path / "copy" / "data")
    shutil.copytree(tmp_path / "models", tmp_path / "copy" / "models")
    copy = ShardStore(tmp_path / "copy" / "data")
    assert copy.usage() == store.usage() and copy.is_complete(mid)
    exported = copy.assemble(m, tmp_path / "out")
    assert [p.read_bytes() for p in exported] == [(folder / f.path).read_bytes() for f in m.files]
    assert copy.assemble(m, copy.model_dir(mid)) == copy.files(mid)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache"])
def test_aligned_chunks_go_around_the_page_cache_and_give_the_same_files(
        tmp_path: Path, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks whose offset and length are multiples of DIRECT_ALIGN are written with O_DIRECT
    (where the file system offers it), the rest through the page cache; out of order, from
    several threads, read back for the file hash: the files come out byte-identical either way."""
    if not direct:
        monkeypatch.setattr(assembly_module, "open_direct", lambda path: None)
    folder = tmp_path / "big"
    folder.mkdir()
    save_file({"w": torch.arange(9 * 4096 // 4 + 77, dtype=torch.float32)}, folder / "m.safetensors")
    m = build_manifest(folder, key=KEY, name="big", version="1", chunk_size=4096, created=1)
    store, mid = stored(tmp_path, m)
    chunks = chunk_data(folder, m)
    asm = store.open_assembly(m)
    if not direct:
        assert asm._direct == [None]
    order = [3, 0, 9, 1, 2] + [i for i in range(m.chunk_count) if i not in (3, 0, 9, 1, 2)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: asm.write(i, chunks[i]), order))
    asm.flush()
    assert store.missing(mid) == []
    paths = asm.finish()
    asm.close()
    assert [p.read_bytes() for p in paths] == [(folder / "m.safetensors").read_bytes()]
    assert [store.read_chunk(mid, i) for i in range(m.chunk_count)] == chunks

"""protocols/shard-vectors.json: manifests, ids, signatures, registry keys and messages against
the spec's bytes.

scripts/gen_shard_vectors.py builds the vector bytes with plain json/struct/msgpack/pynacl from
protocols/shard.md (not with prsm_node.shards), so these tests check the implementation
against the document.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from prsm_node.shards import (
    Chunk,
    End,
    Error,
    ErrorCode,
    GetChunks,
    GetManifest,
    Have,
    HaveReply,
    ManifestReply,
    Message,
    ShardStore,
    build_manifest,
    decode_manifest,
    decode_message,
    encode_manifest,
    encode_message,
    latest_version,
    manifest_id,
    name_key,
    signing_payload,
    verify_manifest,
    version_key,
    version_order,
)
from prsm_node.shards import exceptions as errors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "protocols" / "shard-vectors.json").read_text())
KEY = nacl.signing.SigningKey(bytes.fromhex(VECTORS["publisher"]["seed"]))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    for rel, hexdata in VECTORS["files"].items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(bytes.fromhex(hexdata))
    return folder


def test_key() -> None:
    assert bytes(KEY.verify_key).hex() == VECTORS["publisher"]["public_key"]


def test_manifest_built_from_the_files_matches(source: Path) -> None:
    v = VECTORS["manifest"]
    p = v["params"]
    m = build_manifest(
        source,
        key=KEY,
        name=p["name"],
        version=p["version"],
        description=p["description"],
        license=p["license"],
        tags=p["tags"],
        metadata=p["metadata"],
        chunk_size=p["chunk_size"],
        created=p["created"],
    )
    assert signing_payload(m).hex() == v["signing_payload"]
    assert m.signature.hex() == v["signature"]
    assert encode_manifest(m).hex() == v["hex"]
    assert manifest_id(m).hex() == v["id"]
    assert [h.hex() for h in m.chunk_hashes()] == v["chunks"]
    decoded = decode_manifest(bytes.fromhex(v["hex"]))
    assert decoded == m
    verify_manifest(decoded)


def test_store_round_trip_of_the_vector_model(source: Path, tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "data")
    mid, m = store.put_manifest(bytes.fromhex(VECTORS["manifest"]["hex"]))
    assert mid.hex() == VECTORS["manifest"]["id"]
    store.import_files(m, source)
    for path in store.assemble(m, tmp_path / "out"):
        rel = path.relative_to(tmp_path / "out").as_posix()
        assert path.read_bytes().hex() == VECTORS["files"][rel]


@pytest.mark.parametrize("v", VECTORS["invalid_manifests"], ids=[v["name"] for v in VECTORS["invalid_manifests"]])
def test_invalid_manifest(v: dict[str, str]) -> None:
    with pytest.raises(getattr(errors, v["error"])) as info:
        verify_manifest(decode_manifest(bytes.fromhex(v["hex"])))
    assert type(info.value).__name__ == v["error"]


def message_from(v: dict[str, Any]) -> Message:
    f = v["fields"]
    name = v["name"]
    if name in ("GET_MANIFEST", "HAVE", "GET_CHUNKS"):
        mid = bytes.fromhex(f["manifest_id"])
        if name == "GET_CHUNKS":
            return GetChunks(mid, tuple(f["indices"]))
        return GetManifest(mid) if name == "GET_MANIFEST" else Have(mid)
    if name == "MANIFEST":
        return ManifestReply(bytes.fromhex(f["manifest"]))
    if name == "HAVE_REPLY":
        return HaveReply(f["chunk_count"], bytes.fromhex(f["bitmap"]))
    if name == "CHUNK":
        return Chunk(f["index"], bytes.fromhex(f["data"]))
    if name == "END":
        return End()
    assert name == "ERROR"
    return Error(ErrorCode(f["code"]), f["message"])


@pytest.mark.parametrize("v", VECTORS["messages"], ids=[v["name"] for v in VECTORS["messages"]])
def test_message(v: dict[str, Any]) -> None:
    msg = message_from(v)
    assert encode_message(msg).hex() == v["hex"]
    assert decode_message(bytes.fromhex(v["hex"])) == msg
    if isinstance(msg, HaveReply):
        assert msg.indices() == v["fields"]["indices"]


def test_chunk_message_carries_the_chunk() -> None:
    chunk = next(v for v in VECTORS["messages"] if v["name"] == "CHUNK")
    data = bytes.fromhex(chunk["fields"]["data"])
    m = decode_manifest(bytes.fromhex(VECTORS["manifest"]["hex"]))
    assert hashlib.sha256(data).digest() == m.chunk_hashes()[chunk["fields"]["index"]]


@pytest.mark.parametrize("v", VECTORS["invalid_messages"], ids=[v["name"] for v in VECTORS["invalid_messages"]])
def test_invalid_message(v: dict[str, str]) -> None:
    with pytest.raises(getattr(errors, v["error"])) as info:
        decode_message(bytes.fromhex(v["hex"]))
    assert type(info.value).__name__ == v["error"]


def test_registry() -> None:
    r = VECTORS["registry"]
    p = VECTORS["manifest"]["params"]
    assert name_key(p["name"]).hex() == r["name_key"]
    assert version_key(p["name"], p["version"]).hex() == r["version_key"]
    assert sorted(r["versions"], key=version_order) == r["sorted"]
    assert latest_version(r["versions"]) == r["latest"]


def test_vector_file_is_up_to_date() -> None:
    script = ROOT / "scripts" / "gen_shard_vectors.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

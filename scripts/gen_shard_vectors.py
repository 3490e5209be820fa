"""Regenerate protocols/shard-vectors.json, the model shard test vectors.

Everything here is built straight from protocols/shard.md with plain json, struct, hashlib,
msgpack and pynacl calls, not with prsm_node.shards: two tiny safetensors files (written
byte by byte), their chunking, the manifest's signing payload, signature, encoding and id,
the registry keys, one sample of every /prsm/shard/1.0.0 message, and encodings a decoder
must reject. tests/test_shard_vectors.py checks the implementation against the file. The key
comes from a fixed seed and Ed25519 signatures are deterministic, so rerunning gives the same
file.

    python scripts/gen_shard_vectors.py            # rewrite the file
    python scripts/gen_shard_vectors.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
from _vectors import write_or_check  # noqa: E402 - scripts/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "protocols" / "shard-vectors.json"

SEED = bytes([0x05]) * 32
KEY = nacl.signing.SigningKey(SEED)
CHUNK_SIZE = 1024
CREATED = 1767225600  # 2026-01-01T00:00:00Z
NAME = "prsm/vectors-tiny"
VERSION = "1.0.0"


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def safetensors_file(tensors: list[tuple[str, str, list[int], bytes]], meta: dict[str, str]) -> bytes:
    """A safetensors file: tensors' data in list order, header keys sorted by name, header
    padded with spaces to a multiple of 8 (as the safetensors library writes it)."""
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    entries = {}
    for name, dtype, shape, data in tensors:
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header.update(sorted(entries.items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def model_files() -> dict[str, bytes]:
    weight = struct.pack("<384f", *[(i % 37) * 0.25 - 4.0 for i in range(384)])  # F32 [16, 24]
    bias = struct.pack("<4f", 0.5, -1.0, 2.0, 0.0)  # F32 [4]
    ids = struct.pack("<3q", 7, -1, 1 << 40)  # I64 [3]
    head = bytes(range(10))  # U8 [10]
    return {
        "model.safetensors": safetensors_file(
            [
                ("weight", "F32", [16, 24], weight),
                ("bias", "F32", [4], bias),
                ("empty", "BF16", [0, 5], b""),
                ("ids", "I64", [3], ids),
            ],
            {"format": "pt"},
        ),
        "extra/head.safetensors": safetensors_file([("head", "U8", [10], head)], {}),
    }


DTYPE_SIZE = {"F32": 4, "BF16": 2, "I64": 8, "U8": 1}


def tensor_table(data: bytes) -> tuple[int, list[list[Any]]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    start = 8 + n
    rows = [
        [name, t["dtype"], t["shape"], start + t["data_offsets"][0], start + t["data_offsets"][1]]
        for name, t in header.items()
    ]
    rows.sort(key=lambda r: (r[3], r[4], r[0].encode()))
    return start, rows


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


def manifest_fields(files: dict[str, bytes]) -> list[Any]:
    wire_files = []
    for path in sorted(files, key=lambda p: p.encode()):
        data = files[path]
        start, rows = tensor_table(data)
        hashes = b"".join(hashlib.sha256(c).digest() for c in chunks_of(data))
        wire_files.append([path, len(data), hashlib.sha256(data).digest(), start, hashes, rows])
    metadata = {  # keys in UTF-8 byte order
        "architecture": {"config": {"eps": 1e-05, "hidden": 24, "tied": True}, "name": "decoder_lm"},
        "labels": ["negative", "positive"],
    }
    return [
        1,
        NAME,
        VERSION,
        "A tiny synthetic model for the shard protocol test vectors.",
        "MIT",
        ["classifier", "lm"],
        metadata,
        CHUNK_SIZE,
        wire_files,
        sum(len(d) for d in files.values()),
        bytes(KEY.verify_key),
        CREATED,
    ]


def invalid_manifests(fields: list[Any], signature: bytes) -> list[dict[str, str]]:
    def variant(name: str, error: str, edit: Any) -> dict[str, str]:
        f = copy.deepcopy(fields)
        data = edit(f) if callable(edit) else edit
        if isinstance(data, list):
            data = pack([*data, signature])
        return {"name": name, "error": error, "hex": data.hex()}

    full = pack([*fields, signature])

    def setf(i: int, value: Any) -> Any:
        def edit(f: list[Any]) -> list[Any]:
            f[i] = value
            return f

        return edit

    def file_edit(fn: Any) -> Any:
        def edit(f: list[Any]) -> list[Any]:
            fn(f[8][1])
            return f

        return edit

    return [
        variant("trailing_byte", "ShardDecodeError", full + b"\x00"),
        variant("truncated", "ShardDecodeError", full[:-1]),
        variant("created_as_uint64", "ShardDecodeError", _non_minimal_created(fields, signature)),
        variant("format_2", "ShardDecodeError", setf(0, 2)),
        variant("tags_unsorted", "ShardDecodeError", setf(5, ["lm", "classifier"])),
        variant("metadata_keys_unsorted", "ShardDecodeError", _unsorted_metadata(fields, signature)),
        variant("metadata_nil_value", "ShardDecodeError", setf(6, {"x": None})),
        variant("chunk_size_not_power_of_two", "ShardDecodeError", setf(7, 3072)),
        variant("total_size_wrong", "ShardDecodeError", setf(9, fields[9] + 1)),
        variant("path_dotdot", "ShardDecodeError", file_edit(lambda fe: fe.__setitem__(0, "../model.safetensors"))),
        variant("path_absolute", "ShardDecodeError", file_edit(lambda fe: fe.__setitem__(0, "/model.safetensors"))),
        variant("path_backslash", "ShardDecodeError", file_edit(lambda fe: fe.__setitem__(0, "a\\model.safetensors"))),
        variant("chunk_missing", "ShardDecodeError", file_edit(lambda fe: fe.__setitem__(4, fe[4][:32]))),
        variant("tensor_overlap", "ShardDecodeError", file_edit(lambda fe: _shift(fe[5][1], -4))),
        variant("tensor_unknown_dtype", "ShardDecodeError", file_edit(lambda fe: fe[5][0].__setitem__(1, "F4"))),
        variant("description_changed", "BadManifestSignature", setf(3, "Tampered.")),
        variant("tensor_renamed", "BadManifestSignature", file_edit(lambda fe: fe[5][1].__setitem__(0, "bias2"))),
        variant("publisher_changed", "BadManifestSignature", setf(10, bytes(32))),
        variant("tensor_shape_mismatch", "ShardDecodeError", file_edit(lambda fe: fe[5][0].__setitem__(2, [16, 25]))),
    ]


def _non_minimal_created(fields: list[Any], signature: bytes) -> bytes:
    head = pack(fields[:11])  # an array header of 11, re-headed as 13 below
    body = head[1:] + b"\xcf" + struct.pack(">Q", fields[11]) + pack(signature)
    return bytes([0x90 | 13]) + body


def _unsorted_metadata(fields: list[Any], signature: bytes) -> bytes:
    f = list(fields)
    f[6] = dict(reversed(list(fields[6].items())))
    return pack([*f, signature])


def _shift(tensor: list[Any], delta: int) -> None:
    tensor[3] += delta
    tensor[4] += delta


def messages(manifest: bytes, mid: bytes, chunk2: bytes) -> list[dict[str, Any]]:
    def msg(name: str, fields: dict[str, Any], wire: list[Any]) -> dict[str, Any]:
        return {"name": name, "fields": fields, "hex": pack(wire).hex()}

    return [
        msg("GET_MANIFEST", {"manifest_id": mid.hex()}, [1, mid]),
        msg("MANIFEST", {"manifest": manifest.hex()}, [2, manifest]),
        msg("HAVE", {"manifest_id": mid.hex()}, [3, mid]),
        msg("HAVE_REPLY", {"chunk_count": 3, "bitmap": "a0", "indices": [0, 2]}, [4, 3, bytes([0xA0])]),
        msg("GET_CHUNKS", {"manifest_id": mid.hex(), "indices": [0, 2]}, [5, mid, [0, 2]]),
        msg("CHUNK", {"index": 2, "data": chunk2.hex()}, [6, 2, chunk2]),
        msg("END", {}, [7]),
        msg("ERROR", {"code": 1, "message": "no such manifest"}, [8, 1, "no such manifest"]),
    ]


def invalid_messages(mid: bytes) -> list[dict[str, str]]:
    def bad(name: str, error: str, data: bytes) -> dict[str, str]:
        return {"name": name, "error": error, "hex": data.hex()}

    return [
        bad("unknown_type", "UnknownMessageType", pack([9, mid])),
        bad("type_as_uint16", "ShardDecodeError", b"\x92\xcd\x00\x01" + pack(mid)),
        bad("get_manifest_short_id", "ShardDecodeError", pack([1, mid[:31]])),
        bad("get_chunks_unsorted", "ShardDecodeError", pack([5, mid, [2, 0]])),
        bad("get_chunks_duplicate", "ShardDecodeError", pack([5, mid, [1, 1]])),
        bad("get_chunks_empty", "ShardDecodeError", pack([5, mid, []])),
        bad("get_chunks_too_many", "ShardDecodeError", pack([5, mid, list(range(65))])),
        bad("have_reply_spare_bit", "ShardDecodeError", pack([4, 3, bytes([0xB0])])),
        bad("have_reply_bitmap_length", "ShardDecodeError", pack([4, 3, bytes(2)])),
        bad("chunk_empty", "ShardDecodeError", pack([6, 0, b""])),
        bad("error_unknown_code", "ShardDecodeError", pack([8, 99, "x"])),
        bad("end_with_field", "ShardDecodeError", pack([7, 0])),
        bad("not_an_array", "ShardDecodeError", pack({"type": 1})),
    ]


def build() -> dict[str, Any]:
    files = model_files()
    fields = manifest_fields(files)
    payload = pack(["prsm-manifest-v1", *fields])
    signature = KEY.sign(payload).signature
    manifest = pack([*fields, signature])
    mid = hashlib.sha256(manifest).digest()
    ordered = sorted(files, key=lambda p: p.encode())
    all_chunks = [c for p in ordered for c in chunks_of(files[p])]
    name_key = hashlib.sha256(b"prsm-model-name-v1" + NAME.encode()).digest()
    version_key = hashlib.sha256(b"prsm-model-version-v1" + f"{NAME}:{VERSION}".encode()).digest()
    versions = ["1.9", "1.10", "1.10.0", "2.0-rc1", "beta", "0.9.9"]
    return {
        "publisher": {"seed": SEED.hex(), "public_key": bytes(KEY.verify_key).hex()},
        "files": {p: files[p].hex() for p in ordered},
        "manifest": {
            "params": {
                "name": NAME,
                "version": VERSION,
                "description": fields[3],
                "license": fields[4],
                "tags": fields[5],
                "metadata": fields[6],
                "chunk_size": CHUNK_SIZE,
                "created": CREATED,
            },
            "chunks": [hashlib.sha256(c).hexdigest() for c in all_chunks],
            "signing_payload": payload.hex(),
            "signature": signature.hex(),
            "hex": manifest.hex(),
            "id": mid.hex(),
        },
        "registry": {
            "name_key": name_key.hex(),
            "version_key": version_key.hex(),
            "versions": versions,
            "sorted": sorted(versions, key=_version_order),
            "latest": max(versions, key=_version_order),
        },
        "messages": messages(manifest, mid, all_chunks[2]),
        "invalid_manifests": invalid_manifests(fields, signature),
        "invalid_messages": invalid_messages(mid),
    }


def _version_order(v: str) -> tuple[int, tuple[int, ...], bytes]:
    parts = v.split(".")
    if all(p.isascii() and p.isdigit() for p in parts):
        nums = [int(p) for p in parts]
        while len(nums) > 1 and nums[-1] == 0:
            nums.pop()
        return (1, tuple(nums), v.encode())
    return (0, (), v.encode())


def main() -> int:
    return write_or_check(OUT, json.dumps(build(), indent=1) + "\n", None)


if __name__ == "__main__":
    sys.exit(main())

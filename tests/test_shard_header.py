"""The strict safetensors header parser: what the library writes is accepted, and every
malformed header is refused with InvalidSafetensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from prsm_node.shards import InvalidSafetensors, parse_header, read_header
from prsm_node.shards.header import MAX_HEADER_SIZE, header_length


def file_bytes(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def parse(data: bytes) -> Any:
    n = header_length(data[:8], len(data))
    return parse_header(data[8 : 8 + n], len(data))


def test_library_files_parse(tmp_path: Path) -> None:
    tensors = {
        "a": torch.zeros(3, dtype=torch.float64),
        "b": torch.zeros(2, 2, dtype=torch.int32),
        "c": torch.zeros(5, dtype=torch.uint8),
        "d": torch.zeros(1, dtype=torch.int16),
        "e": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "f": torch.zeros(2, dtype=torch.float8_e5m2),
        "g": torch.zeros(0, dtype=torch.bool),
        "h": torch.zeros((), dtype=torch.float32),  # a scalar: shape []
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(str(path), path.stat().st_size)
    got = {t.name: (t.dtype, t.shape, t.end - t.begin) for t in header.tensors}
    assert got == {
        "a": ("F64", (3,), 24),
        "b": ("I32", (2, 2), 16),
        "c": ("U8", (5,), 5),
        "d": ("I16", (1,), 2),
        "e": ("F8_E4M3", (2,), 2),
        "f": ("F8_E5M2", (2,), 2),
        "g": ("BOOL", (0,), 0),
        "h": ("F32", (), 4),
    }
    assert header.tensors[0].begin == header.data_offset and header.tensors[-1].end == path.stat().st_size


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 8, 12)}


def test_good_header_and_padding() -> None:
    h = parse(file_bytes(GOOD, bytes(12)))
    assert [t.name for t in h.tensors] == ["a", "b"]
    padded = json.dumps(GOOD).encode() + b"    "
    shifted = parse(file_bytes(None, bytes(12), raw=padded))
    assert shifted.data_offset == h.data_offset + 4
    assert [(t.name, t.begin - 4, t.end - 4) for t in shifted.tensors] == [(t.name, t.begin, t.end) for t in h.tensors]
    assert parse(file_bytes({}, b"")).tensors == ()


@pytest.mark.parametrize(
    ("header", "data", "raw"),
    [
        (GOOD, bytes(11), None),  # data shorter than the table
        (GOOD, bytes(13), None),  # trailing bytes not covered by a tensor
        ({"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 4, 8)}, bytes(8), None),  # overlap
        ({"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 12, 16)}, bytes(16), None),  # hole
        ({"a": entry("F32", [3], 0, 8)}, bytes(8), None),  # shape x dtype != length
        ({"a": entry("F4", [2], 0, 1)}, bytes(1), None),  # unknown / sub-byte dtype
        ({"a": entry("f32", [2], 0, 8)}, bytes(8), None),
        ({"a": entry("F32", [2], 8, 0)}, bytes(8), None),  # begin > end
        ({"a": entry("F32", [-2], 0, 8)}, bytes(8), None),
        ({"a": entry("F32", [2.0], 0, 8)}, bytes(8), None),  # type: ignore[list-item]
        ({"a": entry("F32", [True, 2], 0, 8)}, bytes(8), None),
        ({"a": entry("F32", [1] * 17, 0, 4)}, bytes(4), None),  # rank over 16
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8), None),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), None),
        ({"a": [1]}, bytes(8), None),
        ({"": entry("U8", [1], 0, 1)}, bytes(1), None),
        ({"x" * 513: entry("U8", [1], 0, 1)}, bytes(1), None),
        ({"__metadata__": {"a": 1}}, b"", None),
        ({"__metadata__": []}, b"", None),
        (None, b"", b"[]"),
        (None, b"", b' {"a": 1}'),  # must start with '{'
        (None, b"", b"{"),
        (None, b"", b'{"a": NaN}'),
        (None, b"", b'{"a": {}, "a": {}}'),  # duplicate key
        (None, b"", b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'),
        (None, b"", b'{"\xff": 1}'),  # not UTF-8
    ],
)
def test_bad_headers(header: Any, data: bytes, raw: bytes | None) -> None:
    with pytest.raises(InvalidSafetensors):
        parse(file_bytes(header, data, raw=raw))


def test_bad_lengths(tmp_path: Path) -> None:
    for data in (b"", b"\x01\x00", struct.pack("<Q", 1) + b"{", struct.pack("<Q", 100) + b"{}"):
        with pytest.raises(InvalidSafetensors):
            parse(data + bytes(8 - len(data)) if len(data) < 8 else data)
    with pytest.raises(InvalidSafetensors):
        header_length(struct.pack("<Q", MAX_HEADER_SIZE + 1), 2**40)
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{}")
    with pytest.raises(InvalidSafetensors):
        read_header(str(path), 20)  # the caller's size says more than the file holds

"""Strict parsing of a safetensors header into a tensor table with absolute byte ranges.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data section.
The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data section) plus an optional ``"__metadata__"`` map of strings. We need the
byte ranges (the ``safetensors`` library does not expose them), and the input is untrusted, so
the parse is stricter than the library: the header starts with ``{``; duplicate keys, NaN /
Infinity, unknown dtypes and extra keys are refused; every tensor's byte length is its shape's
product times its dtype size; and the ranges, sorted, tile the data section exactly (no hole,
no overlap, nothing past the end). Sub-byte dtypes (F4, F6) are not accepted in this revision.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import InvalidSafetensors

MAX_HEADER_SIZE = 8 * 1024 * 1024
MAX_TENSOR_NAME = 512  # UTF-8 bytes
MAX_RANK = 16
MAX_DIM = (1 << 63) - 1
METADATA_KEY = "__metadata__"

# Bytes per element of every dtype name the safetensors format defines with a whole-byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``[begin, end)`` is its byte range in the whole file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed header: where the data section starts (8 + N) and the tensors, in file order."""

    data_offset: int
    tensors: tuple[TensorInfo, ...]


def tensor_order(t: TensorInfo) -> tuple[int, int, bytes]:
    """The canonical order of a tensor table: by byte range, then by name (empty tensors tie)."""
    return (t.begin, t.end, t.name.encode("utf-8"))


def header_length(prefix: bytes, file_size: int) -> int:
    """The header length N from a file's first 8 bytes, checked against the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise InvalidSafetensors(f"a safetensors file has at least 8 bytes, this one {file_size}")
    (n,) = struct.unpack("<Q", prefix[:8])
    if not 2 <= n <= MAX_HEADER_SIZE:
        raise InvalidSafetensors(f"header length {n} is outside 2..{MAX_HEADER_SIZE}")
    if 8 + n > file_size:
        raise InvalidSafetensors(f"header length {n} runs past the end of a {file_size}-byte file")
    return int(n)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidSafetensors(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise InvalidSafetensors(f"{name} is not allowed in a safetensors header")


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_DIM:
        raise InvalidSafetensors(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _utf8_size(text: str) -> int:
    """UTF-8 length of ``text``; -1 when it holds lone surrogates (JSON ``\\ud800``), which no
    msgpack str can carry."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def _tensor(name: str, entry: Any, data_offset: int, data_size: int) -> TensorInfo:
    if not 1 <= _utf8_size(name) <= MAX_TENSOR_NAME:
        raise InvalidSafetensors(f"tensor name must be 1..{MAX_TENSOR_NAME} UTF-8 bytes, got {name!r}")
    if type(entry) is not dict or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidSafetensors(f"tensor {name!r} must be an object with exactly dtype, shape, data_offsets")
    dtype = entry["dtype"]
    if type(dtype) is not str or dtype not in DTYPE_SIZES:
        raise InvalidSafetensors(f"tensor {name!r} has an unknown dtype {dtype!r}")
    shape = entry["shape"]
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise InvalidSafetensors(f"tensor {name!r} shape must be a list of at most {MAX_RANK} sizes")
    dims = tuple(_int(d, f"tensor {name!r} dimension") for d in shape)
    offsets = entry["data_offsets"]
    if type(offsets) is not list or len(offsets) != 2:
        raise InvalidSafetensors(f"tensor {name!r} data_offsets must be [begin, end]")
    begin, end = (_int(o, f"tensor {name!r} offset") for o in offsets)
    if not begin <= end <= data_size:
        raise InvalidSafetensors(f"tensor {name!r} range [{begin}, {end}) is outside the {data_size}-byte data")
    if math.prod(dims) * DTYPE_SIZES[dtype] != end - begin:
        raise InvalidSafetensors(f"tensor {name!r}: shape {list(dims)} of {dtype} is not {end - begin} bytes")
    return TensorInfo(name, dtype, dims, data_offset + begin, data_offset + end)


def parse_header(header: bytes, file_size: int) -> Header:
    """Parse the JSON header (the N bytes after the length) of a ``file_size``-byte file."""
    data_offset = 8 + len(header)
    if data_offset > file_size:
        raise InvalidSafetensors(f"a {len(header)}-byte header does not fit a {file_size}-byte file")
    if not header.startswith(b"{"):
        raise InvalidSafetensors("the header must start with '{'")
    try:
        doc = json.loads(header.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant)
    except InvalidSafetensors:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidSafetensors(f"the header is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise InvalidSafetensors("the header must be a JSON object")
    meta = doc.pop(METADATA_KEY, {})
    if type(meta) is not dict or any(type(v) is not str for v in meta.values()):
        raise InvalidSafetensors(f"{METADATA_KEY} must be an object of strings")
    data_size = file_size - data_offset
    tensors = sorted((_tensor(k, v, data_offset, data_size) for k, v in doc.items()), key=tensor_order)
    problem = tiling_problem(tensors, data_offset, file_size)
    if problem:
        raise InvalidSafetensors(problem)
    return Header(data_offset, tuple(tensors))


def tiling_problem(tensors: Sequence[TensorInfo], data_offset: int, file_size: int) -> str | None:
    """What is wrong, if anything, with how ``tensors`` (in canonical order) cover the data
    section ``[data_offset, file_size)``: they must tile it exactly, with no hole or overlap."""
    position = data_offset
    for t in tensors:
        if t.begin != position:
            gap = "overlaps the previous tensor" if t.begin < position else f"leaves a hole at byte {position}"
            return f"tensor {t.name!r} at [{t.begin}, {t.end}) {gap}"
        if t.end < t.begin:
            return f"tensor {t.name!r} ends before it begins"
        position = t.end
    if position != file_size:
        return f"tensor data ends at byte {position}, the file at {file_size}"
    return None


def read_header(path: str, file_size: int) -> Header:
    """Read and parse the header of the safetensors file at ``path`` (``file_size`` bytes)."""
    with open(path, "rb") as f:
        n = header_length(f.read(8), file_size)
        header = f.read(n)
    if len(header) != n:
        raise InvalidSafetensors(f"the file ended inside its {n}-byte header")
    return parse_header(header, file_size)

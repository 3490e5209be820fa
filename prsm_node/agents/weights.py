"""Weights come only from safetensors files, checked strictly before and after loading.

No pickle is ever read. Before a byte of tensor data is loaded, each file's header is parsed
here (8-byte little-endian length, then JSON) and compared with the tensors the spec's module
expects: every name present exactly once across all files, nothing extra, each with the
expected shape and dtype, and data offsets that fit the file. Only then does
``safetensors.torch.load_file`` read the data, and the module takes the tensors with a strict
``load_state_dict``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .architectures import build_module, expected_tensors
from .exceptions import InvalidWeights
from .specs import ModelSpec

MAX_HEADER_BYTES = 16 << 20
MAX_FILES = 256

SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


def weight_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder means every ``*.safetensors`` file directly in it (sorted); a list is taken as is."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if folder.is_dir():
            files = sorted(folder.glob("*.safetensors"))
        else:
            files = [folder]
    else:
        files = [Path(p) for p in source]
    if not files:
        raise InvalidWeights(f"no safetensors file in {source}")
    if len(files) > MAX_FILES:
        raise InvalidWeights(f"{len(files)} weight files is over the limit of {MAX_FILES}")
    for f in files:
        if not f.is_file():
            raise InvalidWeights(f"{f} is not a file")
    return files


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name → (dtype, shape) of the tensors in one safetensors file, with its layout checked."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidWeights(f"{path.name}: too short for a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidWeights(f"{path.name}: header length {n} does not fit")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidWeights(f"{path.name}: header is not JSON") from e
    if not isinstance(header, dict):
        raise InvalidWeights(f"{path.name}: header is not an object")
    data_size = size - 8 - n
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _check_entry(path.name, name, entry, data_size)
    return out


def _check_entry(file: str, name: str, entry: Any, data_size: int) -> tuple[torch.dtype, tuple[int, ...]]:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidWeights(f"{where}: malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise InvalidWeights(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidWeights(f"{where}: malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise InvalidWeights(f"{where}: malformed data_offsets")
    begin, end = offsets
    torch_dtype, width = SAFETENSORS_DTYPES[dtype]
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * width:
        raise InvalidWeights(f"{where}: data_offsets do not match its shape or the file")
    return torch_dtype, tuple(shape)


def check_files(spec: ModelSpec, files: Sequence[Path]) -> None:
    """Raise InvalidWeights unless the files hold exactly the tensors ``spec`` expects."""
    expected = expected_tensors(spec)
    found: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for path in files:
        for name, meta in read_header(path).items():
            if name in found:
                raise InvalidWeights(f"tensor {name!r} appears in more than one file")
            found[name] = meta
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise InvalidWeights(f"missing tensor(s) {missing[:8]}")
    if extra:
        raise InvalidWeights(f"unexpected tensor(s) {extra[:8]}")
    for name, (shape, dtype) in expected.items():
        got_dtype, got_shape = found[name]
        if got_shape != shape:
            raise InvalidWeights(f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)}")
        if got_dtype != dtype:
            raise InvalidWeights(f"tensor {name!r} has dtype {got_dtype}, expected {dtype}")


def load_module(spec: ModelSpec, source: str | Path | Sequence[str | Path], device: str | torch.device) -> nn.Module:
    """Build the spec's module on ``device`` with the weights from ``source``, checked strictly,
    in eval mode. Blocking: call it from a worker thread."""
    files = weight_files(source)
    check_files(spec, files)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path), device="cpu"))
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidWeights(f"tensor {name!r} holds NaN or infinite values")
    module = build_module(spec, "meta")
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:  # a second line of defence: the header checks should catch all
        raise InvalidWeights(str(e)) from e
    return module.to(device).eval()


def save_module(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a module's state dict as one safetensors file (what the training script publishes)."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)

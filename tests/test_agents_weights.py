"""Weights load only from safetensors holding exactly the expected tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from prsm_node.agents import InvalidWeights, parse_spec
from prsm_node.agents.architectures import build_module, expected_tensors
from prsm_node.agents.weights import load_module, save_module

from .test_agents_specs import CLF, EMB, LM


def state(raw: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_module(parse_spec(raw)).state_dict().items()}


@pytest.mark.parametrize("raw", [LM, EMB, CLF])
def test_param_count_formula_matches_the_module(raw: dict[str, Any]) -> None:
    spec = parse_spec(raw)
    module = build_module(spec)
    assert sum(p.numel() for p in module.parameters()) == spec.param_count()
    assert set(expected_tensors(spec)) == set(module.state_dict())
    assert not list(module.buffers())  # nothing outside the weights file


@pytest.mark.parametrize("raw", [LM, EMB, CLF])
def test_round_trip(tmp_path: Path, raw: dict[str, Any]) -> None:
    spec = parse_spec(raw)
    torch.manual_seed(1)
    original = build_module(spec)
    save_module(original, tmp_path / "model.safetensors")
    loaded = load_module(spec, tmp_path, "cpu")
    assert not loaded.training
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_weights_split_over_several_files(tmp_path: Path) -> None:
    tensors = state(LM)
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]}, str(tmp_path / "b.safetensors"))
    load_module(parse_spec(LM), tmp_path, "cpu")
    load_module(parse_spec(LM), [tmp_path / "b.safetensors", tmp_path / "a.safetensors"], "cpu")


def _save(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = state(LM)
    del tensors["head.bias"]
    with pytest.raises(InvalidWeights, match="missing.*head.bias"):
        load_module(parse_spec(LM), _save(tmp_path, tensors), "cpu")


def test_extra_tensor(tmp_path: Path) -> None:
    tensors = state(LM)
    tensors["backdoor.weight"] = torch.zeros(2)
    with pytest.raises(InvalidWeights, match="unexpected.*backdoor"):
        load_module(parse_spec(LM), _save(tmp_path, tensors), "cpu")


def test_mis_shaped_tensor(tmp_path: Path) -> None:
    tensors = state(LM)
    tensors["head.weight"] = torch.zeros(tensors["head.weight"].shape[0] + 1, tensors["head.weight"].shape[1])
    with pytest.raises(InvalidWeights, match="head.weight.*shape"):
        load_module(parse_spec(LM), _save(tmp_path, tensors), "cpu")


def test_wrong_dtype(tmp_path: Path) -> None:
    tensors = state(CLF)
    tensors["layers.0.weight"] = tensors["layers.0.weight"].to(torch.float16)
    with pytest.raises(InvalidWeights, match="dtype"):
        load_module(parse_spec(CLF), _save(tmp_path, tensors), "cpu")


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    tensors = state(CLF)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    save_file({"layers.0.bias": tensors["layers.0.bias"]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(InvalidWeights, match="more than one file"):
        load_module(parse_spec(CLF), tmp_path, "cpu")


def test_non_finite_weights(tmp_path: Path) -> None:
    tensors = state(CLF)
    tensors["layers.1.bias"][0] = float("nan")
    with pytest.raises(InvalidWeights, match="NaN"):
        load_module(parse_spec(CLF), _save(tmp_path, tensors), "cpu")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x05\x00\x00",
        (10**9).to_bytes(8, "little") + b"{}",  # header longer than the file
        (4).to_bytes(8, "little") + b"nope",
        (2).to_bytes(8, "little") + b"[]",
        b"\x80\x04\x95 a pickle is never read",
    ],
)
def test_malformed_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidWeights):
        load_module(parse_spec(CLF), path, "cpu")


def test_header_offsets_must_match_shape(tmp_path: Path) -> None:
    path = _save(tmp_path, state(CLF))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"shape":[16]', b'"shape":[17]', 1)
    assert header != raw[8 : 8 + n]
    path.write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(InvalidWeights):
        load_module(parse_spec(CLF), path, "cpu")


def test_no_weight_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidWeights, match="no safetensors"):
        load_module(parse_spec(CLF), tmp_path, "cpu")
    with pytest.raises(InvalidWeights, match="not a file"):
        load_module(parse_spec(CLF), [tmp_path / "absent.safetensors"], "cpu")

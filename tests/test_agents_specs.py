"""Model specs and request inputs are validated strictly, before torch is involved."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from prsm_node.agents import InvalidInput, InvalidSpec, parse_input, parse_spec
from prsm_node.agents.specs import MAX_PARAMS
from prsm_node.agents.text import decode_chars, encode_chars, ngram_features

VOCAB = "abcdefghijklmnopqrstuvwxyz .,"

LM: dict[str, Any] = {
    "name": "char-transformer-lm",
    "config": {"vocab": VOCAB, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "context": 32},
}
EMB: dict[str, Any] = {
    "name": "char-transformer-embedder",
    "config": {"vocab": VOCAB, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "context": 32, "dim": 16},
}
CLF: dict[str, Any] = {
    "name": "mlp-classifier",
    "config": {"labels": ["light", "colour"], "input": "text", "input_dim": 256, "hidden": [16]},
}


def with_config(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    out["config"].update(changes)
    return out


def test_valid_specs_parse_and_round_trip() -> None:
    for raw in (LM, EMB, CLF):
        spec = parse_spec(raw)
        canonical = spec.to_dict()
        assert canonical["name"] == raw["name"]
        assert parse_spec(canonical) == spec
        assert spec.param_count() > 0


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"name": "char-transformer-lm"},
        {"name": "char-transformer-lm", "config": {}, "extra": 1},
        {"name": "gpt-17", "config": {}},
        {"name": "char-transformer-lm", "config": "d_model=32"},
        with_config(LM, dropout=0.1),  # unknown key
        with_config(LM, d_model=True),  # bool is not an int
        with_config(LM, d_model=32.0),
        with_config(LM, d_model="32"),
        with_config(LM, n_heads=3),  # 32 % 3
        with_config(LM, n_layers=0),
        with_config(LM, n_layers=1000),
        with_config(LM, context=10**6),
        with_config(LM, d_model=10**6),
        with_config(LM, vocab=""),
        with_config(LM, vocab="aab"),
        with_config(LM, vocab="".join(chr(0x4E00 + i) for i in range(5000))),
        with_config(LM, positions="rotary"),
        with_config(LM, max_new_tokens=10**6),
        with_config(LM, dtype="float64"),
        with_config(EMB, dim=0),
        with_config(CLF, labels=["only-one"]),
        with_config(CLF, labels=["a", "a"]),
        with_config(CLF, labels=["a", 2]),
        with_config(CLF, hidden=[16, 16, 16, 16, 16]),
        with_config(CLF, hidden=[0]),
        with_config(CLF, input="image"),
        with_config(CLF, ngram_min=4, ngram_max=2),
        with_config(CLF, input="vector", ngram_min=1),
    ],
)
def test_bad_specs_are_rejected(raw: Any) -> None:
    with pytest.raises(InvalidSpec):
        parse_spec(raw)


def test_missing_config_key_is_named() -> None:
    raw = copy.deepcopy(LM)
    del raw["config"]["d_ff"]
    with pytest.raises(InvalidSpec, match="d_ff"):
        parse_spec(raw)


def test_parameter_cap_refuses_a_huge_model_whose_every_field_is_in_range() -> None:
    huge = with_config(LM, d_model=2048, n_heads=16, n_layers=24, d_ff=8192, context=2048)
    with pytest.raises(InvalidSpec, match="parameters"):
        parse_spec(huge)
    wide = with_config(CLF, input_dim=1 << 18, hidden=[4096, 4096])
    with pytest.raises(InvalidSpec, match=str(MAX_PARAMS)):
        parse_spec(wide)


def test_lm_inputs() -> None:
    spec = parse_spec(LM)
    req = parse_input(spec, {"prompt": "light"})
    assert (req.max_new_tokens, req.temperature, req.top_k, req.seed) == (64, 1.0, 0, 0)  # type: ignore[union-attr]
    for bad in (
        {},
        {"prompt": ""},
        {"prompt": 5},
        {"prompt": "x", "max_new_tokens": 0},
        {"prompt": "x", "max_new_tokens": 257},  # over the config's cap (default 256)
        {"prompt": "x", "temperature": float("nan")},
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "top_k": -1},
        {"prompt": "x", "seed": True},
        {"prompt": "x", "stream": True},
        "prompt",
    ):
        with pytest.raises(InvalidInput):
            parse_input(spec, bad)


def test_embedder_and_classifier_inputs() -> None:
    emb = parse_spec(EMB)
    assert parse_input(emb, {"texts": ["a", "b"]}).items == 2
    for bad in ({"texts": []}, {"texts": "a"}, {"texts": [1]}, {"texts": ["a"] * 65}, {"text": "a"}):
        with pytest.raises(InvalidInput):
            parse_input(emb, bad)
    clf = parse_spec(CLF)
    assert parse_input(clf, {"text": "prism"}).items == 1
    with pytest.raises(InvalidInput):
        parse_input(clf, {"vector": [0.0] * 256})
    vec = parse_spec(with_config(CLF, input="vector", input_dim=3))
    assert parse_input(vec, {"vector": [1, 2.5, 3]}).vector == (1.0, 2.5, 3.0)  # type: ignore[union-attr]
    for bad in ({"vector": [1, 2]}, {"vector": [1, 2, float("inf")]}, {"vector": [1, 2, "3"]}, {"text": "x"}):
        with pytest.raises(InvalidInput):
            parse_input(vec, bad)


def test_char_codec_and_ngram_features_are_fixed() -> None:
    ids = encode_chars("abc", "cab?")
    assert ids == [4, 2, 3, 1]
    assert decode_chars("abc", ids) == "cab"
    feats = ngram_features("Light", 64, 1, 2)
    assert feats == ngram_features("  light ", 64, 1, 2)  # case and spacing do not matter
    assert abs(sum(v * v for v in feats.values()) - 1.0) < 1e-9
    # crc32 of " a", "ab", "b ": fixed across processes and machines, unlike hash()
    assert sorted(ngram_features("ab", 1 << 16, 2, 2)) == [15122, 18541, 26515]

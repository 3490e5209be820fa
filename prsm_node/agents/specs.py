"""Model specs: what a model is, as plain data, checked before anything is allocated.

A spec is ``{"name": <family>, "config": {...}}``, stored in a model manifest's metadata under
``"architecture"``. ``parse_spec`` accepts only known families and known keys, with every type
and range bounded, so that a hostile manifest cannot make this node build a huge model: the
parameter count is computed here, in pure Python, and capped before torch is even imported.
The torch modules these configs describe are in ``architectures.py``; this module must not
import torch.

Character tokenizers keep their vocabulary in the config itself (``"vocab": "abc..."``): token
0 is padding, 1 stands for any character not in the vocabulary, and ``vocab[i]`` is ``i + 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from .exceptions import InvalidSpec

LM_FAMILY = "char-transformer-lm"
EMBEDDER_FAMILY = "char-transformer-embedder"
CLASSIFIER_FAMILY = "mlp-classifier"
FAMILY_NAMES = (LM_FAMILY, EMBEDDER_FAMILY, CLASSIFIER_FAMILY)
FAMILY_TAGS = {
    LM_FAMILY: ("lm", "text-generation"),
    EMBEDDER_FAMILY: ("embedding",),
    CLASSIFIER_FAMILY: ("classifier",),
}

MAX_PARAMS = 64_000_000
MAX_LAYERS = 24
MAX_HEADS = 32
MAX_D_MODEL = 2048
MAX_D_FF = 8192
MAX_VOCAB = 1024  # characters, not counting the pad and unknown tokens
MAX_CONTEXT = 2048
MAX_NEW_TOKENS = 1024
MAX_EMBED_DIM = 2048
MAX_LABELS = 256
MAX_LABEL_LEN = 64
MAX_INPUT_DIM = 1 << 18
MAX_HIDDEN_LAYERS = 4
MAX_NGRAM = 6

PAD_ID = 0
UNK_ID = 1
N_SPECIAL = 2

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}
POSITIONS = ("learned", "sinusoidal")
ACTIVATIONS = ("relu", "gelu", "tanh")
INPUT_KINDS = ("text", "vector")


# ------------------------------------------------------------ field checks


def _where(family: str, key: str) -> str:
    return f"{family}.config.{key}"


def _check_keys(cfg: object, family: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise InvalidSpec(f"{family}.config must be an object, not {type(cfg).__name__}")
    keys = set(cfg)
    if not all(isinstance(k, str) for k in keys):
        raise InvalidSpec(f"{family}.config keys must be strings")
    unknown = keys - required - optional
    if unknown:
        raise InvalidSpec(f"{family}.config: unknown key(s) {sorted(unknown)}")
    missing = required - keys
    if missing:
        raise InvalidSpec(f"{family}.config: missing key(s) {sorted(missing)}")
    return cfg


def _int(cfg: dict[str, Any], family: str, key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if type(value) is not int:  # bool is an int subclass: refuse it
        raise InvalidSpec(f"{_where(family, key)} must be an integer")
    if not lo <= value <= hi:
        raise InvalidSpec(f"{_where(family, key)} = {value} is outside [{lo}, {hi}]")
    return value


def _choice(cfg: dict[str, Any], family: str, key: str, choices: tuple[str, ...], default: str) -> str:
    value = cfg.get(key, default)
    if value not in choices:
        raise InvalidSpec(f"{_where(family, key)} must be one of {list(choices)}")
    return str(value)


def _vocab(cfg: dict[str, Any], family: str) -> str:
    vocab = cfg["vocab"]
    if not isinstance(vocab, str) or not 1 <= len(vocab) <= MAX_VOCAB:
        raise InvalidSpec(f"{_where(family, 'vocab')} must be a string of 1 to {MAX_VOCAB} characters")
    if len(set(vocab)) != len(vocab):
        raise InvalidSpec(f"{_where(family, 'vocab')} repeats a character")
    return vocab


# ------------------------------------------------------------ transformer configs


@dataclass(frozen=True)
class TransformerShape:
    """The trunk shared by the language model and the embedder: a pre-LayerNorm transformer
    over character tokens."""

    vocab: str
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    context: int
    positions: str

    @property
    def n_tokens(self) -> int:
        return len(self.vocab) + N_SPECIAL

    def trunk_params(self) -> int:
        d, f = self.d_model, self.d_ff
        block = 4 * d * d + 2 * d * f + 9 * d + f  # 2 LayerNorms, qkv + out proj, 2-layer MLP
        pos = self.context * d if self.positions == "learned" else 0
        return self.n_tokens * d + pos + self.n_layers * block + 2 * d  # + final LayerNorm

    def activation_elements(self, sequences: int) -> int:
        """A generous bound on live activation elements for one inference forward pass."""
        d, t = self.d_model, self.context
        return sequences * t * (6 * d + self.d_ff + 2 * self.n_heads * t + self.n_tokens)


def _shape(cfg: dict[str, Any], family: str) -> TransformerShape:
    vocab = _vocab(cfg, family)
    d_model = _int(cfg, family, "d_model", 4, MAX_D_MODEL)
    n_heads = _int(cfg, family, "n_heads", 1, MAX_HEADS)
    if d_model % n_heads:
        raise InvalidSpec(f"{_where(family, 'd_model')} = {d_model} is not a multiple of n_heads = {n_heads}")
    if (d_model // n_heads) % 2:
        raise InvalidSpec(f"{family}.config: d_model / n_heads must be even")
    return TransformerShape(
        vocab=vocab,
        d_model=d_model,
        n_heads=n_heads,
        n_layers=_int(cfg, family, "n_layers", 1, MAX_LAYERS),
        d_ff=_int(cfg, family, "d_ff", 4, MAX_D_FF),
        context=_int(cfg, family, "context", 4, MAX_CONTEXT),
        positions=_choice(cfg, family, "positions", POSITIONS, "learned"),
    )


_SHAPE_KEYS = {"vocab", "d_model", "n_heads", "n_layers", "d_ff", "context"}


@dataclass(frozen=True)
class LMConfig:
    """A decoder-only character language model with an untied output head."""

    shape: TransformerShape
    max_new_tokens: int
    dtype: str

    def param_count(self) -> int:
        s = self.shape
        return s.trunk_params() + s.d_model * s.n_tokens + s.n_tokens

    def working_bytes(self, batch: int) -> int:
        return self.shape.activation_elements(batch) * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {**_shape_dict(self.shape), "max_new_tokens": self.max_new_tokens, "dtype": self.dtype}


@dataclass(frozen=True)
class EmbedderConfig:
    """A bidirectional character transformer; masked mean pooling, a projection to ``dim``,
    then L2 normalisation."""

    shape: TransformerShape
    dim: int
    dtype: str

    def param_count(self) -> int:
        return self.shape.trunk_params() + self.shape.d_model * self.dim + self.dim

    def working_bytes(self, batch: int) -> int:
        return self.shape.activation_elements(batch) * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {**_shape_dict(self.shape), "dim": self.dim, "dtype": self.dtype}


def _shape_dict(shape: TransformerShape) -> dict[str, Any]:
    return {
        "vocab": shape.vocab,
        "d_model": shape.d_model,
        "n_heads": shape.n_heads,
        "n_layers": shape.n_layers,
        "d_ff": shape.d_ff,
        "context": shape.context,
        "positions": shape.positions,
    }


def _parse_lm(raw: object) -> LMConfig:
    cfg = _check_keys(raw, LM_FAMILY, _SHAPE_KEYS, {"positions", "max_new_tokens", "dtype"})
    return LMConfig(
        shape=_shape(cfg, LM_FAMILY),
        max_new_tokens=_int(cfg, LM_FAMILY, "max_new_tokens", 1, MAX_NEW_TOKENS, 256),
        dtype=_choice(cfg, LM_FAMILY, "dtype", tuple(DTYPE_SIZES), "float32"),
    )


def _parse_embedder(raw: object) -> EmbedderConfig:
    cfg = _check_keys(raw, EMBEDDER_FAMILY, _SHAPE_KEYS | {"dim"}, {"positions", "dtype"})
    return EmbedderConfig(
        shape=_shape(cfg, EMBEDDER_FAMILY),
        dim=_int(cfg, EMBEDDER_FAMILY, "dim", 1, MAX_EMBED_DIM),
        dtype=_choice(cfg, EMBEDDER_FAMILY, "dtype", tuple(DTYPE_SIZES), "float32"),
    )


# ------------------------------------------------------------ classifier config


@dataclass(frozen=True)
class ClassifierConfig:
    """An MLP over either a numeric vector (``input = "vector"``, ``input_dim`` wide) or hashed
    character n-gram counts of a text (``input = "text"``, ``input_dim`` buckets, n-grams of
    ``ngram_min..ngram_max`` characters; see ``text.ngram_features``)."""

    labels: tuple[str, ...]
    input: str
    input_dim: int
    hidden: tuple[int, ...]
    activation: str
    ngram_min: int
    ngram_max: int
    dtype: str

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.input_dim, *self.hidden, len(self.labels))

    def param_count(self) -> int:
        w = self.widths
        return sum(a * b + b for a, b in zip(w, w[1:], strict=False))

    def working_bytes(self, batch: int) -> int:
        return batch * sum(self.widths) * 4 * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": list(self.labels),
            "input": self.input,
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "dtype": self.dtype,
        }
        if self.input == "text":
            out.update(ngram_min=self.ngram_min, ngram_max=self.ngram_max)
        return out


def _parse_classifier(raw: object) -> ClassifierConfig:
    fam = CLASSIFIER_FAMILY
    cfg = _check_keys(
        raw, fam, {"labels", "input", "input_dim"}, {"hidden", "activation", "ngram_min", "ngram_max", "dtype"}
    )
    labels = cfg["labels"]
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise InvalidSpec(f"{_where(fam, 'labels')} must be a list of 2 to {MAX_LABELS} strings")
    if not all(isinstance(x, str) and 1 <= len(x) <= MAX_LABEL_LEN for x in labels):
        raise InvalidSpec(f"{_where(fam, 'labels')}: each label is a string of 1 to {MAX_LABEL_LEN} characters")
    if len(set(labels)) != len(labels):
        raise InvalidSpec(f"{_where(fam, 'labels')} repeats a label")
    kind = _choice(cfg, fam, "input", INPUT_KINDS, "vector")
    hidden = cfg.get("hidden", [])
    if not isinstance(hidden, list) or len(hidden) > MAX_HIDDEN_LAYERS:
        raise InvalidSpec(f"{_where(fam, 'hidden')} must be a list of at most {MAX_HIDDEN_LAYERS} widths")
    for i, width in enumerate(hidden):
        if type(width) is not int or not 1 <= width <= MAX_D_FF:
            raise InvalidSpec(f"{_where(fam, 'hidden')}[{i}] must be an integer in [1, {MAX_D_FF}]")
    if kind == "vector" and ("ngram_min" in cfg or "ngram_max" in cfg):
        raise InvalidSpec(f"{fam}.config: ngram_min/ngram_max apply only to input = 'text'")
    ngram_min = _int(cfg, fam, "ngram_min", 1, MAX_NGRAM, 1)
    ngram_max = _int(cfg, fam, "ngram_max", 1, MAX_NGRAM, 3)
    if ngram_min > ngram_max:
        raise InvalidSpec(f"{fam}.config: ngram_min > ngram_max")
    return ClassifierConfig(
        labels=tuple(labels),
        input=kind,
        input_dim=_int(cfg, fam, "input_dim", 1, MAX_INPUT_DIM),
        hidden=tuple(hidden),
        activation=_choice(cfg, fam, "activation", ACTIVATIONS, "relu"),
        ngram_min=ngram_min,
        ngram_max=ngram_max,
        dtype=_choice(cfg, fam, "dtype", tuple(DTYPE_SIZES), "float32"),
    )


# ------------------------------------------------------------ the spec

FamilyConfig: TypeAlias = LMConfig | EmbedderConfig | ClassifierConfig

_PARSERS: dict[str, Callable[[object], FamilyConfig]] = {
    LM_FAMILY: _parse_lm,
    EMBEDDER_FAMILY: _parse_embedder,
    CLASSIFIER_FAMILY: _parse_classifier,
}


@dataclass(frozen=True)
class ModelSpec:
    """A validated spec. ``to_dict()`` gives back the canonical JSON-able form (defaults
    filled in), which is what a manifest should store."""

    family: str
    config: FamilyConfig

    def param_count(self) -> int:
        return self.config.param_count()

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.config.dtype]

    def param_bytes(self) -> int:
        return self.param_count() * self.dtype_size

    def working_bytes(self, batch: int) -> int:
        """An estimate of the memory one batched forward pass needs beyond the weights."""
        return self.config.working_bytes(batch)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.family, "config": self.config.to_dict()}


def parse_spec(raw: object) -> ModelSpec:
    """Validate a spec dict strictly; raise ``InvalidSpec`` naming the offending key."""
    if isinstance(raw, ModelSpec):
        return raw
    if not isinstance(raw, dict) or set(raw) != {"name", "config"}:
        raise InvalidSpec('a model spec is exactly {"name": <family>, "config": {...}}')
    family = raw["name"]
    if family not in _PARSERS:
        raise InvalidSpec(f"unknown model family {family!r}; known: {list(FAMILY_NAMES)}")
    config = _PARSERS[family](raw["config"])
    spec = ModelSpec(family=family, config=config)
    params = spec.param_count()
    if params > MAX_PARAMS:
        raise InvalidSpec(f"{family}: {params} parameters is over the cap of {MAX_PARAMS}")
    return spec


def finite_float(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

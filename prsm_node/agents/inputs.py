"""Requests and results: plain dicts in, frozen dataclasses inside, plain values out.

Per family, the inputs of ``runtime.run(model_id, inputs)`` are:

- language model: ``{"prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int,
  "seed": int}``; only ``prompt`` is required. ``temperature`` 0 is greedy decoding; ``top_k``
  0 samples from the whole vocabulary. Output: the generated text (``str``, prompt excluded).
- embedder: ``{"texts": [str, ...]}``. Output: one L2-normalised vector (``list[float]``) per text.
  Texts longer than the model's context are cut to their first ``context`` characters.
- classifier: ``{"text": str}`` or ``{"vector": [float, ...]}`` as the model's config says.
  Output: ``{label: probability}``.

Anything else (an unknown key, a bool for an int, NaN, too long, too many) is ``InvalidInput``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from .exceptions import InvalidInput
from .specs import ClassifierConfig, EmbedderConfig, LMConfig, ModelSpec, finite_float

MAX_PROMPT_CHARS = 16_384
MAX_TEXT_CHARS = 16_384
MAX_TEXTS = 64
MAX_SEED = (1 << 63) - 1
MAX_TEMPERATURE = 10.0
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class GenerateInput:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    @property
    def items(self) -> int:
        return 1


@dataclass(frozen=True)
class EmbedInput:
    texts: tuple[str, ...]

    @property
    def items(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class ClassifyInput:
    text: str | None = None
    vector: tuple[float, ...] | None = None

    @property
    def items(self) -> int:
        return 1


ModelInput: TypeAlias = GenerateInput | EmbedInput | ClassifyInput
Output: TypeAlias = str | list[list[float]] | dict[str, float]


@dataclass(frozen=True)
class Usage:
    """Compute one request used, for payment receipts: tokens (characters, n-grams or vector
    entries) read and generated, and the wall time of the batch it ran in, on which device."""

    tokens_in: int
    tokens_out: int
    wall_ms: float
    batch_size: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "wall_ms": self.wall_ms,
            "batch_size": self.batch_size,
            "device": self.device,
        }


@dataclass(frozen=True)
class RunResult:
    output: Output
    usage: Usage


def _keys(raw: object, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs must be an object, not {type(raw).__name__}")
    unknown = set(raw) - required - optional
    if unknown:
        raise InvalidInput(f"unknown input key(s) {sorted(map(str, unknown))}")
    missing = required - set(raw)
    if missing:
        raise InvalidInput(f"missing input key(s) {sorted(missing)}")
    return raw


def _int(raw: dict[str, Any], key: str, lo: int, hi: int, default: int) -> int:
    value = raw.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidInput(f"{key} must be an integer in [{lo}, {hi}]")
    return value


def _text(value: object, key: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(f"{key} must be a string of at most {limit} characters")
    return value


def _generate(cfg: LMConfig, raw: object) -> GenerateInput:
    d = _keys(raw, {"prompt"}, {"max_new_tokens", "temperature", "top_k", "seed"})
    prompt = _text(d["prompt"], "prompt", MAX_PROMPT_CHARS)
    if not prompt:
        raise InvalidInput("prompt must not be empty")
    temperature = d.get("temperature", 1.0)
    if not finite_float(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidInput(f"temperature must be a number in [0, {MAX_TEMPERATURE}]")
    default_new = min(DEFAULT_MAX_NEW_TOKENS, cfg.max_new_tokens)
    return GenerateInput(
        prompt=prompt,
        max_new_tokens=_int(d, "max_new_tokens", 1, cfg.max_new_tokens, default_new),
        temperature=float(temperature),
        top_k=_int(d, "top_k", 0, cfg.shape.n_tokens, 0),
        seed=_int(d, "seed", 0, MAX_SEED, 0),
    )


def _embed(raw: object) -> EmbedInput:
    d = _keys(raw, {"texts"}, set())
    texts = d["texts"]
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_TEXTS:
        raise InvalidInput(f"texts must be a list of 1 to {MAX_TEXTS} strings")
    return EmbedInput(texts=tuple(_text(t, "texts[]", MAX_TEXT_CHARS) for t in texts))


def _classify(cfg: ClassifierConfig, raw: object) -> ClassifyInput:
    if cfg.input == "text":
        d = _keys(raw, {"text"}, set())
        return ClassifyInput(text=_text(d["text"], "text", MAX_TEXT_CHARS))
    d = _keys(raw, {"vector"}, set())
    vector = d["vector"]
    if not isinstance(vector, list) or len(vector) != cfg.input_dim:
        raise InvalidInput(f"vector must be a list of exactly {cfg.input_dim} numbers")
    if not all(finite_float(x) for x in vector):
        raise InvalidInput("vector entries must be finite numbers")
    return ClassifyInput(vector=tuple(float(x) for x in vector))


def parse_input(spec: ModelSpec, raw: object) -> ModelInput:
    """Validate the inputs of one request for the model ``spec`` describes."""
    cfg = spec.config
    if isinstance(cfg, LMConfig):
        return _generate(cfg, raw)
    if isinstance(cfg, EmbedderConfig):
        return _embed(raw)
    return _classify(cfg, raw)

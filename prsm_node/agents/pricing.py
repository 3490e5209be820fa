"""What a task costs: compute units, prices, the royalty split. Pure functions, integers only.

A task's **compute units** are ``usage.tokens_in + usage.tokens_out`` (characters read and
generated for a language model; characters read and vector entries written for an embedder;
non-zero n-gram features or vector entries read for a classifier). Its price is
``units × price_per_unit``, capped at the payer's authorised maximum. ``max_units`` bounds the
units of a request from its inputs and the model's spec alone, before anything runs: the router
uses it for the budget, the executor to refuse a maximum that would not cover its price.

The model's publisher receives ``floor(amount × royalty)`` of each remote task, where the
royalty is the genesis parameter ``agents_royalty`` (a fraction "N/D"; default 1/10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .exceptions import AgentError
from .inputs import ClassifyInput, EmbedInput, GenerateInput, ModelInput, Usage
from .specs import ClassifierConfig, EmbedderConfig, LMConfig, ModelSpec

DEFAULT_PRICE_PER_UNIT = 10**12  # 10^-6 FTNS per compute unit
DEFAULT_ROYALTY = Fraction(1, 10)
MAX_PRICE_PER_UNIT = 10**24
_FRACTION = re.compile(r"([0-9]{1,18})/([1-9][0-9]{0,17})")


class RoyaltyParamError(AgentError):
    """Raised when the genesis parameter ``agents_royalty`` is not a fraction in [0, 1]."""


def royalty_from_genesis(params: dict[str, Any]) -> Fraction:
    """``params["agents_royalty"]``: "N/D" (or [N, D]) with 0 <= N/D <= 1; default 1/10."""
    raw = params.get("agents_royalty")
    if raw is None:
        return DEFAULT_ROYALTY
    if isinstance(raw, str) and (m := _FRACTION.fullmatch(raw)):
        value = Fraction(int(m.group(1)), int(m.group(2)))
    elif isinstance(raw, list) and len(raw) == 2 and all(type(x) is int for x in raw) and raw[1] > 0 and raw[0] >= 0:
        value = Fraction(raw[0], raw[1])
    else:
        raise RoyaltyParamError(f'params.agents_royalty must be a fraction like "1/10", got {raw!r}')
    if value > 1:
        raise RoyaltyParamError(f"params.agents_royalty must be at most 1, got {raw!r}")
    return value


def units(usage: Usage) -> int:
    return usage.tokens_in + usage.tokens_out


def max_units(spec: ModelSpec, request: ModelInput) -> int:
    """An upper bound of ``units(usage)`` for ``request`` on a model of ``spec``."""
    cfg = spec.config
    if isinstance(cfg, LMConfig) and isinstance(request, GenerateInput):
        return min(len(request.prompt), cfg.shape.context) + request.max_new_tokens
    if isinstance(cfg, EmbedderConfig) and isinstance(request, EmbedInput):
        return sum(min(len(t), cfg.shape.context) for t in request.texts) + len(request.texts) * cfg.dim
    if isinstance(cfg, ClassifierConfig) and isinstance(request, ClassifyInput):
        if request.vector is not None:
            return len(request.vector)
        n = cfg.ngram_max - cfg.ngram_min + 1
        return min(cfg.input_dim, (len(request.text or "") + 2) * n)
    raise AgentError(f"inputs of type {type(request).__name__} do not fit a {spec.family} model")


@dataclass(frozen=True)
class Charge:
    """What one task costs and who receives it: ``amount = executor_amount + publisher_amount``."""

    units: int
    price_per_unit: int
    amount: int
    executor_amount: int
    publisher: bytes
    publisher_amount: int


def charge_for(
    used: int, price_per_unit: int, max_amount: int, *, royalty: Fraction, payer: bytes, executor: bytes,
    publisher: bytes,
) -> Charge:
    """The charge of a task that used ``used`` units. The royalty goes to a third-party
    publisher only: a publisher that is the payer or the executor gets no separate share."""
    amount = min(used * price_per_unit, max_amount)
    share = 0 if publisher in (payer, executor) else amount * royalty.numerator // royalty.denominator
    return Charge(used, price_per_unit, amount, amount - share, publisher, share)

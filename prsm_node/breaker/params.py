"""Circuit-breaker parameters, read from ``genesis.params`` (other subsystems' keys are ignored).

Thresholds are exact fractions of the total stake, never floats, so that every node compares
the same integers: ``{"numerator": 1, "denominator": 3}`` or the string ``"1/3"``. The
freshness window bounds how old (or how far ahead of the local clock) a vote relayed by
gossip may be; every node of a network should apply the same window, hence genesis.

The vote limits bound what one staked voter can make the network carry (protocols/breaker.md,
"Vote limits"): in each window of ``vote_window_ms`` (by the local clock) a node relays at
most ``max_votes_per_model`` votes of one voter on one model, and votes of one voter on at
most ``max_models_per_voter`` distinct models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .exceptions import BreakerParamsError

DEFAULT_HALT_THRESHOLD = Fraction(1, 3)
DEFAULT_RESUME_THRESHOLD = Fraction(2, 3)
DEFAULT_MAX_VOTE_AGE_MS = 10 * 60 * 1000
DEFAULT_MAX_VOTE_FUTURE_MS = 30 * 1000
DEFAULT_VOTE_WINDOW_MS = 60 * 1000
DEFAULT_MAX_VOTES_PER_MODEL = 4
DEFAULT_MAX_MODELS_PER_VOTER = 128
MAX_LIMIT = 1 << 20
MAX_DENOMINATOR = 10**6
MAX_WINDOW_MS = 7 * 24 * 3600 * 1000

_FRACTION = re.compile(r"([0-9]{1,7})/([0-9]{1,7})")


@dataclass(frozen=True)
class BreakerParams:
    """``halt_threshold`` and ``resume_threshold`` are fractions of the total stake with
    ``0 < halt <= resume <= 1``: the hysteresis of protocols/breaker.md."""

    halt_threshold: Fraction = DEFAULT_HALT_THRESHOLD
    resume_threshold: Fraction = DEFAULT_RESUME_THRESHOLD
    max_vote_age_ms: int = DEFAULT_MAX_VOTE_AGE_MS
    max_vote_future_ms: int = DEFAULT_MAX_VOTE_FUTURE_MS
    vote_window_ms: int = DEFAULT_VOTE_WINDOW_MS
    max_votes_per_model: int = DEFAULT_MAX_VOTES_PER_MODEL
    max_models_per_voter: int = DEFAULT_MAX_MODELS_PER_VOTER

    @classmethod
    def from_genesis_params(cls, params: dict[str, Any]) -> BreakerParams:
        p = cls(
            halt_threshold=_fraction(params, "breaker_halt_threshold", DEFAULT_HALT_THRESHOLD),
            resume_threshold=_fraction(params, "breaker_resume_threshold", DEFAULT_RESUME_THRESHOLD),
            max_vote_age_ms=_window(params, "breaker_max_vote_age_ms", DEFAULT_MAX_VOTE_AGE_MS),
            max_vote_future_ms=_window(params, "breaker_max_vote_future_ms", DEFAULT_MAX_VOTE_FUTURE_MS),
            vote_window_ms=_window(params, "breaker_vote_window_ms", DEFAULT_VOTE_WINDOW_MS),
            max_votes_per_model=_limit(params, "breaker_max_votes_per_model", DEFAULT_MAX_VOTES_PER_MODEL),
            max_models_per_voter=_limit(params, "breaker_max_models_per_voter", DEFAULT_MAX_MODELS_PER_VOTER),
        )
        p.validate()
        return p

    def validate(self) -> None:
        for name in ("halt_threshold", "resume_threshold"):
            value = getattr(self, name)
            if type(value) is not Fraction or not 0 < value <= 1 or value.denominator > MAX_DENOMINATOR:
                raise BreakerParamsError(
                    f"params.breaker_{name} must be a fraction in (0, 1] with a denominator of at most "
                    f"{MAX_DENOMINATOR}, got {value!r}"
                )
        if self.halt_threshold > self.resume_threshold:
            raise BreakerParamsError(
                f"params.breaker_halt_threshold ({self.halt_threshold}) must not exceed "
                f"params.breaker_resume_threshold ({self.resume_threshold})"
            )
        for name in ("max_vote_age_ms", "max_vote_future_ms"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_WINDOW_MS:
                raise BreakerParamsError(f"params.breaker_{name} must be an integer in [0, {MAX_WINDOW_MS}]")
        if type(self.vote_window_ms) is not int or not 1 <= self.vote_window_ms <= MAX_WINDOW_MS:
            raise BreakerParamsError(f"params.breaker_vote_window_ms must be an integer in [1, {MAX_WINDOW_MS}]")
        for name in ("max_votes_per_model", "max_models_per_voter"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= MAX_LIMIT:
                raise BreakerParamsError(f"params.breaker_{name} must be an integer in [1, {MAX_LIMIT}]")


def _fraction(params: dict[str, Any], name: str, default: Fraction) -> Fraction:
    value = params.get(name)
    if value is None:
        return default
    numerator: object = None
    denominator: object = None
    if isinstance(value, str):
        m = _FRACTION.fullmatch(value)
        if m:
            numerator, denominator = int(m.group(1)), int(m.group(2))
    elif isinstance(value, dict) and set(value) == {"numerator", "denominator"}:
        numerator, denominator = value["numerator"], value["denominator"]
    if type(numerator) is not int or type(denominator) is not int or denominator <= 0 or numerator < 0:
        raise BreakerParamsError(
            f'params.{name} must be {{"numerator": n, "denominator": d}} or "n/d" with integers '
            f"0 < n <= d <= {MAX_DENOMINATOR}, got {value!r}"
        )
    return Fraction(numerator, denominator)


def _window(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if type(value) is not int or not 0 <= value <= MAX_WINDOW_MS:
        raise BreakerParamsError(f"params.{name} must be an integer (ms) in [0, {MAX_WINDOW_MS}], got {value!r}")
    return value


def _limit(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        raise BreakerParamsError(f"params.{name} must be an integer in [1, {MAX_LIMIT}], got {value!r}")
    return value

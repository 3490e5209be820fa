"""The prompter: each subtask's inputs, in the shape its model's family takes (inputs.py).

``shape`` builds the real inputs from the query and the results of the subtask's
dependencies; ``worst_case`` builds inputs of the largest size ``shape`` can produce for that
model, so the budget check (``pricing.max_units``) runs before anything else does.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..specs import ClassifierConfig, EmbedderConfig, LMConfig, ModelSpec
from .architect import Subtask

MAX_NEW_TOKENS = 48
TEMPERATURE = 0.8


def _seed(query: str) -> int:
    return int.from_bytes(hashlib.sha256(query.encode()).digest()[:4], "big")


def shape(task: Subtask, spec: ModelSpec, query: str, passages: list[str], results: dict[str, Any]) -> dict[str, Any]:
    cfg = spec.config
    if isinstance(cfg, EmbedderConfig):
        return {"texts": [query, *passages]}
    if isinstance(cfg, ClassifierConfig):
        if cfg.input != "text":
            raise ValueError("only text classifiers are routed")
        return {"text": query}
    assert isinstance(cfg, LMConfig)
    passage = (results.get("retrieve") or {}).get("passage") or ""
    prompt = f"{passage} {query}".strip()[-cfg.shape.context:]
    return {"prompt": prompt or query, "max_new_tokens": min(MAX_NEW_TOKENS, cfg.max_new_tokens),
            "temperature": TEMPERATURE, "seed": _seed(query)}


def worst_case(task: Subtask, spec: ModelSpec, query: str, passages: list[str]) -> dict[str, Any]:
    cfg = spec.config
    if isinstance(cfg, LMConfig):
        return {"prompt": "x" * cfg.shape.context, "max_new_tokens": min(MAX_NEW_TOKENS, cfg.max_new_tokens)}
    return shape(task, spec, query, passages, {})


def usable(spec: ModelSpec) -> bool:
    """Models this prompter can shape inputs for."""
    cfg = spec.config
    return not (isinstance(cfg, ClassifierConfig) and cfg.input != "text")

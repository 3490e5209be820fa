"""Embeddings of the corpus passages, kept per model after they were computed and paid for.

The retrieval embeds the query together with up to 15 corpus passages. The passages come from
a fixed corpus and a model is content-addressed (its id is the hash of its manifest, weights
included), so a passage's vector under one model id never changes: once a run (remote and
paid, or local) has returned it, the pipeline keeps it here, keyed by model id and text, and
later queries send only the query and the passages not seen yet. The answer is the same as
without the cache, up to the floating-point rounding of the batch a vector was computed in
(an embedder's rows do not depend on each other: padding is masked), which is far below the
4 decimals the answer reports. The query itself is never taken from the cache.

Vectors are checked before they are kept (one finite number per dimension of the model), and
the cache is bounded (least recently used out first).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Completion = Callable[[Any], list[list[float]]]
MAX_VECTORS = 8192  # a whole corpus (the Opticks has ~2,850 passages) for two models


class EmbeddingCache:
    def __init__(self, limit: int = MAX_VECTORS) -> None:
        self.limit = limit
        self._vectors: OrderedDict[tuple[bytes, str], list[float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, model_id: bytes, text: str) -> list[float] | None:
        vector = self._vectors.get((model_id, text))
        if vector is None:
            self.misses += 1
            return None
        self.hits += 1
        self._vectors.move_to_end((model_id, text))
        return vector

    def put(self, model_id: bytes, text: str, vector: list[float]) -> None:
        self._vectors[(model_id, text)] = vector
        self._vectors.move_to_end((model_id, text))
        while len(self._vectors) > self.limit:
            self._vectors.popitem(last=False)

    def split(self, model_id: bytes, dim: int, texts: list[str]) -> tuple[list[str], Completion]:
        """For an embedder request of ``texts`` (the query first, then passages): the texts to
        send (the query and the passages not cached), and ``complete(output)``, which checks the
        vectors the model returned for them, keeps the new passage vectors and returns the
        vectors of all ``texts`` in order. Raises ValueError when the output is malformed."""
        known = [self.get(model_id, t) for t in texts[1:]]
        send = [texts[0], *(t for t, v in zip(texts[1:], known, strict=True) if v is None)]

        def complete(output: Any) -> list[list[float]]:
            if not isinstance(output, list) or len(output) != len(send) or not all(_vector(v, dim) for v in output):
                raise ValueError(f"expected {len(send)} vectors of {dim} finite numbers")
            fresh = iter(output[1:])
            out = [output[0]]
            for text, vector in zip(texts[1:], known, strict=True):
                if vector is None:
                    vector = next(fresh)
                    self.put(model_id, text, vector)
                out.append(vector)
            return out

        return send, complete


def _vector(value: Any, dim: int) -> bool:
    return (isinstance(value, list) and len(value) == dim
            and all(type(x) is float and math.isfinite(x) for x in value))

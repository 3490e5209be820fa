"""Embeddings of the corpus passages, kept per model after they were computed and paid for.

The retrieval embeds the query together with up to 15 corpus passages. The passages come from
a fixed corpus and a model is content-addressed (its id is the hash of its manifest, weights
included), so a passage's vector under one model id never changes: once a run (remote and
paid, or local) has returned it, the pipeline keeps it here, keyed by model id and text, and
later queries send only the query and the passages not seen yet. The answer is the same as
without the cache, up to the floating-point rounding of the batch a vector was computed in
(an embedder's rows do not depend on each other: padding is masked), which is far below the
4 decimals the answer reports. The query itself is never taken from the cache.

**One request per passage at a time.** Queries that arrive together (a burst: hundreds at
once) find the same passages missing; each would send them all. Instead the first query to
lack a passage's vector fetches it, and concurrent queries that lack it too wait for that
request (``shared``) rather than sending it again. If that request fails, the waiting queries'
attempt fails with ``VectorsUnavailable`` and the pipeline tries again, sending it itself.

Vectors are checked before they are kept (one finite number per dimension of the model), and
the cache is bounded (least recently used out first).

**Unit vectors.** The retrieval ranks passages by cosine similarity. A kept passage's vector is
normalised once (``unit``), not again for every query that ranks it; the cosine of two unit
vectors is then ``1 - dist²/2``, one C call (``math.dist``) per passage.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio

from ..exceptions import AgentError

MAX_VECTORS = 8192  # a whole corpus (the Opticks has ~2,850 passages) for two models
Key = tuple[bytes, str]
Unit = tuple[float, ...] | None  # a vector divided by its length; None for the zero vector


def unit_vector(vector: list[float]) -> Unit:
    norm = math.hypot(*vector)
    return tuple([x / norm for x in vector]) if norm else None


def cosines(query: Unit, units: list[Unit]) -> list[float]:
    """Cosine similarity of ``query`` to each of ``units`` (unit vectors of one length);
    0.0 where either is the zero vector."""
    if query is None:
        return [0.0] * len(units)
    dist = math.dist
    return [1.0 - dist(query, u) ** 2 * 0.5 if u is not None else 0.0 for u in units]


class VectorsUnavailable(AgentError):
    """Raised to a query that waited for passage vectors another query's request was fetching,
    when that request failed: the query's own attempt fails, and its next one sends them."""


@dataclass(eq=False)
class _Flight:
    """A passage vector one query's request is fetching, awaited by the others that lack it."""

    done: trio.Event = field(default_factory=trio.Event)
    vector: list[float] | None = None


class Split:
    """One retrieval's use of the cache: ``send`` (the query and the passages nobody has
    fetched), ``await complete(output)`` for every text's vector in order, and ``release()``
    (always, in a ``finally``) so that nobody waits on a request that will not answer."""

    def __init__(self, cache: EmbeddingCache, model_id: bytes, dim: int, texts: list[str]) -> None:
        self._cache = cache
        self._model_id = model_id
        self._dim = dim
        self._texts = texts
        self._known: list[list[float] | _Flight | None] = []  # per passage: a vector, a flight to await, or ours
        self._own: dict[str, _Flight] = {}
        send = [texts[0]]
        for text in texts[1:]:
            found: list[float] | _Flight | None = cache.get(model_id, text)
            if found is None:
                flight = cache.flights.get((model_id, text))
                if flight is not None:
                    cache.shared += 1
                    found = flight
                elif text not in self._own:
                    self._own[text] = cache.flights[(model_id, text)] = _Flight()
                    send.append(text)
            self._known.append(found)
        self.send = send

    @property
    def cached(self) -> int:
        """Passages this retrieval does not send (known, or fetched by another query)."""
        return len(self._texts) - len(self.send)

    async def complete(self, output: Any) -> list[list[float]]:
        """Check the vectors the model returned for ``send``, keep the passages' (waking the
        queries waiting on them), then wait for the passages other queries are fetching.
        Raises ValueError when the output is malformed, VectorsUnavailable when a request
        this one waited on failed."""
        dim = self._dim
        if not isinstance(output, list) or len(output) != len(self.send) or not all(_vector(v, dim) for v in output):
            raise ValueError(f"expected {len(self.send)} vectors of {dim} finite numbers")
        for text, vector in zip(self.send[1:], output[1:], strict=True):
            self._cache.put(self._model_id, text, vector)
            flight = self._own[text]
            flight.vector = vector
        self.release()
        out = [output[0]]
        for text, known in zip(self._texts[1:], self._known, strict=True):
            if known is None:
                own = self._own[text].vector
                assert own is not None
                out.append(own)
            elif isinstance(known, _Flight):
                await known.done.wait()
                if known.vector is None:
                    raise VectorsUnavailable("the request another query made for a passage's vector failed")
                out.append(known.vector)
            else:
                out.append(known)
        return out

    def release(self) -> None:
        """End this retrieval's flights: waiters wake, with the vector if it came."""
        for text, flight in self._own.items():
            if not flight.done.is_set():
                if self._cache.flights.get((self._model_id, text)) is flight:
                    del self._cache.flights[(self._model_id, text)]
                flight.done.set()


class EmbeddingCache:
    def __init__(self, limit: int = MAX_VECTORS) -> None:
        self.limit = limit
        self._vectors: OrderedDict[Key, list[float]] = OrderedDict()
        self._units: dict[Key, tuple[list[float], Unit]] = {}  # a kept vector and its unit vector
        self.flights: dict[Key, _Flight] = {}  # passages a request is fetching now
        self.hits = 0
        self.misses = 0
        self.shared = 0  # passages a query waited for instead of sending them again

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
            key, _ = self._vectors.popitem(last=False)
            self._units.pop(key, None)

    def unit(self, model_id: bytes, text: str, vector: list[float]) -> Unit:
        """``unit_vector(vector)``, computed once while ``vector`` is the one kept for ``text``."""
        key = (model_id, text)
        known = self._units.get(key)
        if known is not None and known[0] is vector:
            return known[1]
        u = unit_vector(vector)
        if self._vectors.get(key) is vector:
            self._units[key] = (vector, u)
        return u

    def split(self, model_id: bytes, dim: int, texts: list[str]) -> Split:
        """For an embedder request of ``texts`` (the query first, then passages): what to send,
        and how to complete the answer (``Split``)."""
        return Split(self, model_id, dim, texts)


def _vector(value: Any, dim: int) -> bool:
    return isinstance(value, list) and len(value) == dim and all(type(x) is float and math.isfinite(x) for x in value)

"""The router: which model on which peer runs a subtask.

The registry is built per query: this node's own runnable models, and the ``LIST`` catalogue
of every connected peer (asked in parallel; each answer also measures the peer's round trip).
Catalogue entries carry the manifest's capability tags, the model's architecture, the
publisher, the executor's price and current load. For a capability the router keeps the
models that have the tag, whose architecture this node can shape inputs for, and that the
circuit breaker has not halted (checked again right before each run), and ranks them:
local first (no payment, no network), then by price, load and latency.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID

from ...logs import kv
from ..exceptions import InvalidSpec
from ..specs import ModelSpec, parse_spec
from ..task import Hosted, TaskFailed, TaskService
from ..task_messages import CatalogueEntry
from .prompter import usable

log = logging.getLogger(__name__)

LIST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Candidate:
    model_id: bytes
    name: str
    spec: ModelSpec
    peer: ID | None  # None: this node
    price_per_unit: int
    load: int
    rtt_ms: float
    tags: tuple[str, ...]
    entry: CatalogueEntry | None = None
    hosted: Hosted | None = None

    @property
    def local(self) -> bool:
        return self.peer is None

    def rank(self) -> tuple[int, int, int, float]:
        return (0 if self.local else 1, self.price_per_unit, self.load, self.rtt_ms)


class Router:
    def __init__(self, tasks: TaskService, is_halted: Callable[[bytes], bool]) -> None:
        self.tasks = tasks
        self.is_halted = is_halted
        self.candidates: list[Candidate] = []
        self.unreachable: list[str] = []

    async def discover(self) -> list[Candidate]:
        found: list[Candidate] = []
        for mid, h in (await self.tasks.hosted()).items():
            found.append(Candidate(mid, h.name, h.spec, None, 0, 0, 0.0, h.tags, hosted=h))
        me = self.tasks.host.get_id()
        peers = [p for p in self.tasks.host.get_network().connections if p != me]
        self.unreachable = []

        async def ask(peer: ID) -> None:
            try:
                with trio.fail_after(LIST_TIMEOUT):
                    entries, rtt = await self.tasks.list_models(peer)
            except (TaskFailed, trio.TooSlowError) as exc:
                self.unreachable.append(str(peer))
                log.info("no catalogue", extra=kv(peer=str(peer), error=str(exc)))
                return
            for e in entries:
                try:
                    spec = parse_spec(e.architecture)
                except InvalidSpec:
                    continue
                found.append(Candidate(e.model_id, e.name, spec, peer, e.price_per_unit, e.load, rtt, e.tags, entry=e))

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        self.candidates = found
        return found

    def route(self, capability: str) -> list[Candidate]:
        """Candidates for ``capability``, best first; halted models never appear."""
        ok = [c for c in self.candidates
              if capability in c.tags and usable(c.spec) and not self.is_halted(c.model_id)]
        return sorted(ok, key=lambda c: c.rank())

    def describe(self) -> list[dict[str, Any]]:
        return [{"model": c.name, "model_id": c.model_id.hex(), "peer": str(c.peer) if c.peer else "local",
                 "price_per_unit": str(c.price_per_unit), "load": c.load, "rtt_ms": round(c.rtt_ms, 2)}
                for c in self.candidates]

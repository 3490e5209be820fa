"""The router: which model on which peer runs a subtask.

The registry has three sources: this node's own runnable models; the ``LIST`` catalogue of
every connected peer (asked in parallel; each answer also measures the peer's round trip);
and the providers of known models found through Kademlia. Every model id this node has seen
in a catalogue is remembered; for the ones with a capability a query needs, a provider lookup
(``find_providers`` of the manifest id, through the shard exchange's ``Providers``: the
records the exchange announces for every model it holds) finds peers this node is not
connected to. They are dialled and asked ``LIST`` like the others, so a model is reachable as
long as the DHT knows who holds it, not only when its host happens to be a neighbour.

The registry is shared by concurrent queries: it is refreshed every ``max_age`` seconds (or
after ``MISS_REFRESH_S`` when it lacks a capability a query needs), by one query at a time
(the others use the last registry meanwhile; only the very first refresh, and one a query
lacking a capability needs, is waited for), and provider lookups of one model are repeated at
most every ``provider_ttl`` seconds.

Catalogue entries carry the manifest's capability tags, the model's architecture, the
publisher, the executor's price and current load. For a capability the router keeps the
models that have the tag, whose architecture this node can shape inputs for, and that the
circuit breaker has not halted (checked again right before each run), and ranks them: local
first (no payment, no network), then by price, load (the executor's own figure, less this
node's requests it included, plus this node's requests running or waiting there now) and latency.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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
LOOKUP_TIMEOUT = 5.0
MAX_LOOKUPS = 8  # provider lookups per refresh
MAX_PROVIDERS = 8  # providers asked per model
MAX_KNOWN = 256  # remembered model ids
REFRESH_S = 2.0
MISS_REFRESH_S = 1.0  # a registry that lacks a capability a query needs is refreshed at most this often
PROVIDER_TTL = 30.0


def refresh_due(now: float, refreshed: float, *, max_age: float, missing: bool) -> bool:
    """Whether a registry last refreshed at ``refreshed`` is refreshed for a query at ``now``:
    once it is ``max_age`` old, or ``MISS_REFRESH_S`` old when it lacks a capability the query
    needs (a model may have been published, or its host connected, since; an ask right after a
    publish need not wait ``max_age``, nor does a network lacking a capability refresh on
    every query)."""
    age = now - refreshed
    return age >= max_age or (missing and age >= MISS_REFRESH_S)


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
    via: str = "local"  # "local", "connected" (a neighbour's catalogue) or "dht" (a provider lookup)
    own: int = 0  # this node's requests outstanding there when the catalogue was read (part of ``load``)

    @property
    def local(self) -> bool:
        return self.peer is None


class Router:
    def __init__(self, tasks: TaskService, is_halted: Callable[[bytes], bool], *, providers: Any = None,
                 max_age: float = REFRESH_S, provider_ttl: float = PROVIDER_TTL) -> None:
        self.tasks = tasks
        self.is_halted = is_halted
        self.providers = providers  # exchange.providers.Providers, or None: neighbours only
        self.max_age = max_age
        self.provider_ttl = provider_ttl
        self.candidates: list[Candidate] = []
        self.unreachable: list[str] = []
        self.known: dict[bytes, tuple[str, ...]] = {}  # model id -> tags, from every catalogue seen
        self._found: dict[bytes, tuple[float, list[ID]]] = {}  # model id -> (when, providers)
        self._refreshed: float | None = None
        self._lock = trio.Lock()
        self.refreshes = 0
        self.lookups = 0

    async def discover(self, capabilities: Iterable[str] = (), *, force: bool = False) -> list[Candidate]:
        """The registry, refreshed when ``refresh_due`` (or ``force``). Providers of known
        models with one of ``capabilities`` are looked up in the DHT. A query that finds a
        capability missing waits for a refresh under way rather than take the registry that
        lacks it; one that finished while it waited will do."""
        wanted = set(capabilities)
        called = trio.current_time()
        missing = self._refreshed is not None and any(not self.route(c) for c in wanted)
        if not force and self._refreshed is not None and (
            not refresh_due(called, self._refreshed, max_age=self.max_age, missing=missing)
            or (self._lock.locked() and not missing)
        ):
            return self.candidates  # fresh, or another query is refreshing it: the last registry will do
        async with self._lock:
            now = trio.current_time()
            if force or self._refreshed is None or (
                self._refreshed < called and refresh_due(now, self._refreshed, max_age=self.max_age, missing=missing)
            ):
                await self._refresh(wanted)
                self._refreshed = trio.current_time()
        return self.candidates

    async def _refresh(self, wanted: set[str]) -> None:
        self.refreshes += 1
        found: list[Candidate] = []
        for mid, h in (await self.tasks.hosted()).items():
            found.append(Candidate(mid, h.name, h.spec, None, 0, 0, 0.0, h.tags, hosted=h))
            self._remember(mid, h.tags)
        me = self.tasks.host.get_id()
        neighbours = [p for p in self.tasks.host.get_network().connections if p != me]
        self.unreachable = []
        asked: set[ID] = set()
        async with trio.open_nursery() as nursery:
            for peer in neighbours:
                asked.add(peer)
                nursery.start_soon(self._ask, peer, "connected", found)
        if self.providers is not None:
            await self._lookup(wanted, me)
            async with trio.open_nursery() as nursery:
                for _, peers in self._found.values():
                    for peer in peers:
                        if peer not in asked:
                            asked.add(peer)
                            nursery.start_soon(self._ask, peer, "dht", found)
        self.candidates = found

    async def _ask(self, peer: ID, via: str, found: list[Candidate]) -> None:
        try:
            with trio.fail_after(LIST_TIMEOUT):
                entries, rtt = await self.tasks.list_models(peer)
        except (TaskFailed, trio.TooSlowError) as exc:
            self.unreachable.append(str(peer))
            log.info("no catalogue", extra=kv(peer=str(peer), via=via, error=str(exc)))
            return
        own = self.tasks.outstanding(peer)
        for e in entries:
            try:
                spec = parse_spec(e.architecture)
            except InvalidSpec:
                continue
            self._remember(e.model_id, e.tags)
            found.append(Candidate(e.model_id, e.name, spec, peer, e.price_per_unit, e.load, rtt, e.tags,
                                   entry=e, via=via, own=own))

    def _remember(self, model_id: bytes, tags: tuple[str, ...]) -> None:
        self.known.pop(model_id, None)
        self.known[model_id] = tags
        while len(self.known) > MAX_KNOWN:
            self.known.pop(next(iter(self.known)))

    async def _lookup(self, wanted: set[str], me: ID) -> None:
        """Provider lookups for known models with a wanted capability, at most MAX_LOOKUPS, in
        parallel; a model's providers are looked up again after ``provider_ttl``."""
        now = trio.current_time()
        due = [mid for mid, tags in reversed(self.known.items())
               if wanted & set(tags) and not self.is_halted(mid)
               and (mid not in self._found or now - self._found[mid][0] >= self.provider_ttl)][:MAX_LOOKUPS]

        async def one(mid: bytes) -> None:
            self.lookups += 1
            peers: list[ID] = []
            with trio.move_on_after(LOOKUP_TIMEOUT):
                peers = [p for p in await self.providers.find(mid, MAX_PROVIDERS) if p != me][:MAX_PROVIDERS]
            self._found[mid] = (trio.current_time(), peers)

        async with trio.open_nursery() as nursery:
            for mid in due:
                nursery.start_soon(one, mid)

    def rank(self, c: Candidate) -> tuple[int, int, int, float]:
        """Local first, then price, load, latency. The load is the executor's figure less what
        this node had there when it was read (others' work, as of then), plus what this node
        has there now: the executor's figure alone would count this node's requests twice and
        keep a busy executor looking busy until the next refresh."""
        load = max(0, c.load - c.own) + (self.tasks.outstanding(c.peer) if c.peer is not None else 0)
        return (0 if c.local else 1, c.price_per_unit, load, c.rtt_ms)

    def route(self, capability: str) -> list[Candidate]:
        """Candidates for ``capability``, best first; halted models never appear."""
        ok = [c for c in self.candidates
              if capability in c.tags and usable(c.spec) and not self.is_halted(c.model_id)]
        return sorted(ok, key=self.rank)

    def describe(self) -> list[dict[str, Any]]:
        return [{"model": c.name, "model_id": c.model_id.hex(), "peer": str(c.peer) if c.peer else "local",
                 "via": c.via, "price_per_unit": str(c.price_per_unit), "load": c.load,
                 "rtt_ms": round(c.rtt_ms, 2)}
                for c in self.candidates]

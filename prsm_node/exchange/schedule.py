"""Who fetches which chunk: the queue of missing chunks and the providers of one fetch.

Pure bookkeeping, no I/O and no clock: :class:`Fetch` (fetch.py) owns the streams and calls
these methods from its tasks. Work stealing over one shared queue of missing chunk indices
(rarest first, then in order; requeued chunks first): each worker takes the next batch its
provider holds, so a fast provider comes back for work sooner and takes more; batches shrink
near the end so no provider sits on a large tail. A provider is penalised for a failure and
dropped after ``max_failures``; whatever it held in flight goes back to the queue. A provider
whose rate falls far below the best (``slow_factor``) is marked slow and only gets chunks
nobody else holds.

How many providers work at once ramps up (``ramp_bytes``): a fetch starts with one, and after
each ``ramp_bytes`` received it compares the fetch's rate over that window with the rate before
the last provider was added; a provider is added while the rate still rose by ``ramp_gain``,
else the last one added is parked and the count stays (settled). Where one provider cannot
fill the fetcher (a far peer, a slow disk) the fetch spreads over several; where the fetcher
is the bottleneck (one machine's CPUs, as on a loopback devnet) extra providers only add
work, and it keeps the one. A settled ramp goes on measuring each window: one whose rate falls
below ``ramp_reopen`` times the rate it settled at (a provider that slowed down since) opens
the ramp again, from that lower rate: another provider is tried, kept if the rate rises, and
the ramp settles anew, at the new rate. A dropped provider's place goes to an idle one, and a provider is
activated beyond the count whenever it holds pending chunks no active provider holds.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libp2p.peer.id import ID

from ..logs import kv
from ..shards import MAX_CHUNKS_PER_REQUEST
from .client import ShardStream

log = logging.getLogger(__name__)


@dataclass
class FetchParams:
    parallel_peers: int = 4  # FETCH_PARALLEL_PEERS
    streams_per_peer: int = 1  # at most MAX_STREAMS_PER_PEER (4)
    max_batch: int = MAX_CHUNKS_PER_REQUEST
    max_request_bytes: int = 16 << 20  # chunks asked in one GET_CHUNKS, in bytes
    open_timeout: float = 10.0
    response_timeout: float = 30.0  # RESPONSE_TIMEOUT, per frame
    max_failures: int = 3
    slow_factor: float = 0.2  # slower than this fraction of the best provider's rate: slow
    slow_min_chunks: int = 8  # chunks a provider must have delivered before it is judged
    busy_backoff: float = 1.0
    busy_backoff_max: float = 60.0
    pipeline: bool = True  # send the next GET_CHUNKS before reading the current answer
    store_flush_bytes: int = 2 << 20  # received chunks are verified and written in one thread call per this much
    ramp_bytes: int = 32 << 20  # bytes received per ramp step (see above); 0: parallel_peers at once from the start
    ramp_gain: float = 0.1  # a provider added is kept when the fetch's rate rose by at least this fraction
    ramp_reopen: float = 0.5  # settled, a window's rate below this fraction of the settled rate re-opens the ramp


@dataclass
class Provider:
    peer: ID
    have: set[int]
    spare: ShardStream | None = None  # the stream HAVE went over, for the first worker
    chunks: int = 0
    bytes: int = 0
    busy: float = 0.0  # seconds spent in GET_CHUNKS exchanges, summed over its streams
    failures: int = 0
    bad_chunks: int = 0
    dropped: str | None = None
    slow: bool = False
    active: bool = False
    workers: int = 0
    parked: bool = False  # its workers stop after their batch: the ramp took it out
    backoff: float = 0.0
    resume_at: float = 0.0

    def rate(self) -> float:
        return self.bytes / self.busy if self.busy > 0 else 0.0

    def json(self) -> dict[str, Any]:
        return {
            "peer_id": str(self.peer),
            "chunks": self.chunks,
            "bytes": self.bytes,
            "rate_bps": round(self.rate()),
            "failures": self.failures,
            "bad_chunks": self.bad_chunks,
            "slow": self.slow,
            "dropped": self.dropped,
        }


class Schedule:
    """The pending chunks, what is in flight with whom, and the providers' standing.
    ``on_change`` is called when a waiting worker or the fetch loop may have something new."""

    def __init__(self, params: FetchParams, chunk_size: int, on_change: Callable[[], None]) -> None:
        self.params = params
        self.chunk_size = chunk_size
        self.on_change = on_change
        self.providers: dict[ID, Provider] = {}
        self.pending: set[int] = set()
        self.in_flight: dict[int, ID] = {}
        self.workers = 0
        self._order: list[int] = []
        self._retry: deque[int] = deque()
        self.target = 1 if params.ramp_bytes else params.parallel_peers  # providers at once (the ramp's count)
        self.ramp_settled = not params.ramp_bytes
        self.ramp_steps: list[tuple[int, float]] = []  # (providers, rate in bytes/s) of each ramp window
        self._window_start: float | None = None
        self._window_bytes = 0
        self._ramp_before = 0.0  # the rate before the last provider was added
        self._ramp_adding = False  # the next provider activated is the ramp's
        self._ramp_added: Provider | None = None
        self._settled_rate = 0.0  # the rate the ramp settled at (watched for a fall, see the module docstring)
        self.ramp_reopened = 0

    def start(self, missing: list[int]) -> None:
        """Queue ``missing``, rarest first among the providers known now, then by index. No
        worker runs now (a round ended, or none began): every provider is idle again, so a
        second round (chunks of an earlier run found damaged) starts workers for them anew."""
        for p in self.providers.values():
            p.active = p.parked = False
        self.pending = set(missing)
        rarity = {i: 0 for i in missing}
        for p in self.providers.values():
            for i in p.have & self.pending:
                rarity[i] += 1
        self._order = sorted(missing, key=lambda i: (rarity[i], i))

    def live(self) -> list[Provider]:
        return [p for p in self.providers.values() if not p.dropped]

    def finished(self) -> bool:
        return not self.pending and not self.in_flight

    def done(self, index: int) -> bool:
        """A chunk arrived verified: True when it was in flight (counted once)."""
        return self.in_flight.pop(index, None) is not None

    def to_activate(self) -> list[Provider]:
        """Idle providers to start workers for, most useful first, up to ``target`` active; beyond
        it, those holding pending chunks that no active provider holds (the fetch never waits on
        a provider the ramp left out)."""
        live = self.live()
        active = [p for p in live if p.active]
        room = min(self.target, self.params.parallel_peers) - len(active)
        out: list[Provider] = []
        idle = sorted((p for p in live if not p.active), key=lambda p: -len(p.have & self.pending))
        for p in idle:
            if len(out) >= room:
                break
            if p.have & self.pending:
                out.append(p)
        if out and self._ramp_adding:
            self._ramp_added, self._ramp_adding = out[0], False
        rest = [p for p in idle if p not in out]
        if rest and self.pending:
            uncovered = set(self.pending)
            for p in active + out:
                uncovered -= p.have
            while uncovered and rest:
                best = max(rest, key=lambda p: len(p.have & uncovered))
                if not best.have & uncovered:
                    break
                rest.remove(best)
                out.append(best)
                uncovered -= best.have
        for p in out:
            p.active, p.parked = True, False
        return out

    def stopped(self, p: Provider) -> None:
        """A worker of ``p`` ended; with its last, ``p`` is idle again (it may be activated anew)."""
        self.workers -= 1
        p.workers -= 1
        if p.workers <= 0:
            p.active = False

    def received(self, nbytes: int, now: float) -> None:
        """``nbytes`` arrived verified at time ``now``: one step of the ramp when a window of
        ``ramp_bytes`` is full (see the module docstring). The first window starts at the first
        bytes received (the round trips before them are not a rate)."""
        if not self.params.ramp_bytes:
            return
        if self._window_start is None:
            self._window_start = now
            return
        self._window_bytes += nbytes
        if self._window_bytes < self.params.ramp_bytes:
            return
        rate = self._window_bytes / max(now - self._window_start, 1e-6)
        active = [p for p in self.live() if p.active and not p.parked]
        self._window_start, self._window_bytes = now, 0
        idle = [p for p in self.live() if not p.active and p.have & self.pending]
        if self.ramp_settled:
            if rate < self.params.ramp_reopen * self._settled_rate and idle \
                    and len(active) < self.params.parallel_peers:
                self.ramp_steps.append((len(active), rate))
                self.ramp_settled = False
                self.ramp_reopened += 1
                log.info("fetch ramp reopened", extra=kv(providers=len(active), rate=round(rate),
                                                         settled=round(self._settled_rate)))
                self._add_one(rate, active)
            return
        self.ramp_steps.append((len(active), rate))
        added = self._ramp_added
        if added is not None and rate < self._ramp_before * (1 + self.params.ramp_gain):
            self.ramp_settled = True
            self._settled_rate = self._ramp_before
            self.target = max(len(active), 1)
            if len(active) > 1 and added in active:
                added.parked = True  # its workers finish their batch and stop
                self.target = len(active) - 1
            log.info("fetch ramp settled", extra=kv(providers=self.target, rate=round(rate),
                                                    before=round(self._ramp_before)))
            self.on_change()
            return
        if len(active) >= self.params.parallel_peers or not idle:
            self.ramp_settled = True
            self._settled_rate = rate
            self.target = max(len(active), 1)
            return
        self._add_one(rate, active)

    def _add_one(self, rate: float, active: list[Provider]) -> None:
        """Try one more provider; ``rate`` is the rate to beat."""
        self._ramp_before = rate
        self._ramp_added = None
        self.target = len(active) + 1
        self._ramp_adding = True
        self.on_change()

    def batch_size(self) -> int:
        share = math.ceil(len(self.pending) / max(1, 2 * self.workers))
        by_bytes = max(1, self.params.max_request_bytes // self.chunk_size)
        return max(1, min(self.params.max_batch, by_bytes, share))

    def take(self, p: Provider) -> list[int]:
        """The next batch for ``p``: pending chunks it holds, requeued ones first. A slow provider
        only gets chunks that no other live, not-slow provider holds."""
        n = self.batch_size()
        others = [q.have for q in self.live() if q is not p and not q.slow] if p.slow else []

        def fits(i: int) -> bool:
            return i in self.pending and i in p.have and not any(i in h for h in others)

        out: list[int] = []
        for i in list(self._retry):
            if len(out) >= n:
                break
            if fits(i):
                out.append(i)
                self.pending.discard(i)
        if len(self._order) > 2 * len(self.pending) + 256:
            self._order = [i for i in self._order if i in self.pending]
        if len(out) < n:
            for i in self._order:
                if fits(i):
                    out.append(i)
                    self.pending.discard(i)
                    if len(out) >= n:
                        break
        if out:
            taken = set(out)
            self._retry = deque(i for i in self._retry if i not in taken and i in self.pending)
            for i in out:
                self.in_flight[i] = p.peer
        return sorted(out)

    def requeue(self, batch: list[int], p: Provider) -> None:
        """Chunks of ``batch`` still in flight with ``p`` go back to the queue, first in line."""
        back = [i for i in batch if self.in_flight.get(i) == p.peer]
        for i in back:
            del self.in_flight[i]
            self.pending.add(i)
            self._retry.append(i)
        if back:
            self.on_change()

    def stuck(self) -> list[int]:
        """Pending chunks no live provider holds, when nothing is in flight (else [])."""
        if self.in_flight or not self.pending:
            return []
        held: set[int] = set()
        for p in self.live():
            held |= p.have
        return sorted(self.pending - held)

    def penalise(self, p: Provider, why: str) -> None:
        p.failures += 1
        log.info("provider penalised", extra=kv(peer=str(p.peer), failures=p.failures, why=why))
        if p.failures >= self.params.max_failures:
            self.drop(p, f"{p.failures} failures, last: {why}")

    def drop(self, p: Provider, why: str) -> None:
        if p.dropped is None:
            p.dropped = why
            log.info("provider dropped", extra=kv(peer=str(p.peer), why=why))
            self.on_change()

    def check_slow(self) -> None:
        measured = [q for q in self.live() if q.chunks >= self.params.slow_min_chunks and q.busy > 0]
        if len(measured) < 2:
            return
        best = max(q.rate() for q in measured)
        for q in measured:
            if not q.slow and q.rate() < self.params.slow_factor * best:
                q.slow = True
                log.info("provider is slow", extra=kv(peer=str(q.peer), rate=round(q.rate()), best=round(best)))

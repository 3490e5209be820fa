"""Who fetches which chunk: the queue of missing chunks and the providers of one fetch.

Pure bookkeeping, no I/O and no clock: :class:`Fetch` (fetch.py) owns the streams and calls
these methods from its tasks. Work stealing over one shared queue of missing chunk indices
(rarest first, then in order; requeued chunks first): each worker takes the next batch its
provider holds, so a fast provider comes back for work sooner and takes more; batches shrink
near the end so no provider sits on a large tail. A provider is penalised for a failure and
dropped after ``max_failures``; whatever it held in flight goes back to the queue. A provider
whose rate falls far below the best (``slow_factor``) is marked slow and only gets chunks
nobody else holds.
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

    def start(self, missing: list[int]) -> None:
        """Queue ``missing``, rarest first among the providers known now, then by index. No
        worker runs now (a round ended, or none began): every provider is idle again, so a
        second round (chunks of an earlier run found damaged) starts workers for them anew."""
        for p in self.providers.values():
            p.active = False
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
        """Idle providers to start workers for, most useful first, up to ``parallel_peers`` active."""
        live = self.live()
        room = self.params.parallel_peers - sum(p.active for p in live)
        out: list[Provider] = []
        for p in sorted((p for p in live if not p.active), key=lambda p: -len(p.have & self.pending)):
            if len(out) >= room:
                break
            if p.have & self.pending:
                p.active = True
                out.append(p)
        return out

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

"""Provider records: who serves a content key. Pure: no I/O; time comes from an injected clock.

A provider record says "peer P serves key K, at these addresses" and lives ``ttl`` seconds
unless P announces it again. Everything a remote peer can make us store is bounded: keys,
providers per key, keys per provider, addresses per record. When a bound is hit the oldest
entry goes (least recently announced), so a flood pushes out old records instead of
stopping the node from learning new ones. See protocols/kad.md, "Provider records".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# A provider record lives this long unless its provider announces it again.
PROVIDER_TTL = 24 * 3600.0
# A node announces its own records again after this long (before they expire elsewhere).
PROVIDER_REPUBLISH_INTERVAL = 22 * 3600.0
MAX_PROVIDER_KEYS = 4096
MAX_PROVIDERS_PER_KEY = 20
# One peer providing more keys than this pushes out its own oldest records first.
MAX_KEYS_PER_PROVIDER = 1024
MAX_PROVIDER_ADDRS = 8
# Provider keys are content ids (a 32-byte manifest id); 80 is go-libp2p-kad-dht's cap.
MAX_PROVIDER_KEY_LEN = 80
# Inbound ADD_PROVIDER / PUT_VALUE per peer: a burst, refilled at a steady rate.
WRITE_BURST = 256
WRITES_PER_SECOND = 32.0
MAX_LIMITED_PEERS = 4096

Clock = Callable[[], float]


@dataclass(frozen=True)
class ProviderRecord:
    peer_id: bytes
    addrs: tuple[bytes, ...]  # binary multiaddrs, without /p2p/
    expires: float


class ProviderStore:
    """Bounded provider records, oldest evicted. ``clock`` is seconds, monotonic."""

    def __init__(
        self,
        *,
        ttl: float = PROVIDER_TTL,
        max_keys: int = MAX_PROVIDER_KEYS,
        max_per_key: int = MAX_PROVIDERS_PER_KEY,
        max_keys_per_provider: int = MAX_KEYS_PER_PROVIDER,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self.max_keys_per_provider = max_keys_per_provider
        self.clock = clock
        # key -> provider -> record, both least recently announced first
        self._by_key: OrderedDict[bytes, OrderedDict[bytes, ProviderRecord]] = OrderedDict()
        # provider -> its keys, least recently announced first
        self._by_provider: dict[bytes, OrderedDict[bytes, None]] = {}
        self.added = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return sum(len(p) for p in self._by_key.values())

    def key_count(self) -> int:
        return len(self._by_key)

    def add(self, key: bytes, peer_id: bytes, addrs: tuple[bytes, ...]) -> None:
        """Store (or refresh) ``peer_id`` as a provider of ``key``; the caller has checked
        that the sender is ``peer_id`` and that the key and addresses are well formed."""
        if not key or len(key) > MAX_PROVIDER_KEY_LEN:
            raise ValueError(f"provider key must be 1 to {MAX_PROVIDER_KEY_LEN} bytes")
        record = ProviderRecord(peer_id, tuple(addrs[:MAX_PROVIDER_ADDRS]), self.clock() + self.ttl)
        providers = self._by_key.get(key)
        if providers is None:
            providers = self._by_key[key] = OrderedDict()
        self._by_key.move_to_end(key)
        providers[peer_id] = record
        providers.move_to_end(peer_id)
        own = self._by_provider.setdefault(peer_id, OrderedDict())
        own[key] = None
        own.move_to_end(key)
        self.added += 1
        while len(own) > self.max_keys_per_provider:
            self._drop(next(iter(own)), peer_id)
            self.evicted += 1
        while len(providers) > self.max_per_key:
            self._drop(key, next(iter(providers)))
            self.evicted += 1
        while len(self._by_key) > self.max_keys:
            oldest_key, oldest = next(iter(self._by_key.items()))
            for provider in list(oldest):
                self._drop(oldest_key, provider)
                self.evicted += 1

    def get(self, key: bytes) -> list[ProviderRecord]:
        """Unexpired providers of ``key``, most recently announced first."""
        providers = self._by_key.get(key)
        if not providers:
            return []
        now = self.clock()
        for record in [r for r in providers.values() if r.expires <= now]:
            self._drop(key, record.peer_id)
            self.expired += 1
        return list(reversed(providers.values()))

    def remove(self, key: bytes, peer_id: bytes) -> None:
        if peer_id in self._by_key.get(key, {}):
            self._drop(key, peer_id)

    def expire(self) -> int:
        """Drop every expired record; returns how many went."""
        now = self.clock()
        gone = [(k, p) for k, ps in self._by_key.items() for p, r in ps.items() if r.expires <= now]
        for key, peer_id in gone:
            self._drop(key, peer_id)
        self.expired += len(gone)
        return len(gone)

    def _drop(self, key: bytes, peer_id: bytes) -> None:
        providers = self._by_key[key]
        del providers[peer_id]
        if not providers:
            del self._by_key[key]
        own = self._by_provider[peer_id]
        del own[key]
        if not own:
            del self._by_provider[peer_id]


class WriteLimiter:
    """Per-peer token buckets for requests that make us store something."""

    def __init__(
        self,
        *,
        burst: int = WRITE_BURST,
        rate: float = WRITES_PER_SECOND,
        max_peers: int = MAX_LIMITED_PEERS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self.max_peers = max_peers
        self.clock = clock
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # peer -> (tokens, at)

    def allow(self, peer_id: bytes) -> bool:
        now = self.clock()
        tokens, at = self._buckets.pop(peer_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[peer_id] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_peers:
            # Forgetting a peer refills its bucket; only the least recently active go.
            self._buckets.popitem(last=False)
        return allowed

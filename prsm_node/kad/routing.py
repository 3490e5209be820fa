"""Kademlia routing table: k-buckets by XOR distance of SHA-256 keys. Pure: no I/O, no clock.

As in the libp2p kad-dht spec, the distance between two keys is the XOR of their SHA-256
digests; bucket ``i`` holds peers whose digest shares exactly ``i`` leading bits with ours.
A full bucket keeps its peers (old peers are the most likely to stay up) and parks the
newcomer in a replacement list, promoted when a peer in the bucket fails a request.
There is deliberately no per-subnet cap: every peer of a devnet shares 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

KEY_BITS = 256


def kad_key(raw: bytes) -> int:
    """The position of a key (a peer id's bytes, or any lookup key) in the XOR space."""
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def common_prefix_len(a: int, b: int) -> int:
    return KEY_BITS - (a ^ b).bit_length()


def random_key_in_bucket(local: int, index: int, *, max_tries: int = 1 << 16) -> bytes | None:
    """A random lookup key whose SHA-256 shares exactly ``index`` leading bits with ``local``.

    Brute force: about 2**(index+1) hashes, so callers only refresh the low buckets.
    """
    for _ in range(max_tries):
        raw = os.urandom(32)
        if common_prefix_len(kad_key(raw), local) == index:
            return raw
    return None


@dataclass
class Entry:
    peer_id: bytes
    key: int
    last_seen: float


class RoutingTable:
    def __init__(self, local_id: bytes, bucket_size: int = 20) -> None:
        self.local_id = local_id
        self.local_key = kad_key(local_id)
        self.k = bucket_size
        self._buckets: list[OrderedDict[bytes, Entry]] = [OrderedDict() for _ in range(KEY_BITS)]
        self._replacements: list[OrderedDict[bytes, Entry]] = [OrderedDict() for _ in range(KEY_BITS)]
        self._bucket_touched: list[float] = [0.0] * KEY_BITS
        self.version = 0  # bumped on every membership change, for waiters

    def bucket_index(self, peer_id: bytes) -> int:
        return min(common_prefix_len(kad_key(peer_id), self.local_key), KEY_BITS - 1)

    def seen(self, peer_id: bytes, now: float) -> bool:
        """Record a live peer. Returns True if it is (now) in the table, False if parked."""
        if peer_id == self.local_id:
            return False
        index = self.bucket_index(peer_id)
        bucket = self._buckets[index]
        self._bucket_touched[index] = now
        if peer_id in bucket:
            bucket[peer_id].last_seen = now
            bucket.move_to_end(peer_id)
            return True
        entry = Entry(peer_id, kad_key(peer_id), now)
        if len(bucket) < self.k:
            bucket[peer_id] = entry
            self._replacements[index].pop(peer_id, None)
            self.version += 1
            return True
        spare = self._replacements[index]
        spare[peer_id] = entry
        spare.move_to_end(peer_id)
        while len(spare) > self.k:
            spare.popitem(last=False)
        return False

    def failed(self, peer_id: bytes) -> None:
        """A peer did not answer: drop it and promote the freshest replacement."""
        index = self.bucket_index(peer_id)
        self._replacements[index].pop(peer_id, None)
        if self._buckets[index].pop(peer_id, None) is None:
            return
        self.version += 1
        spare = self._replacements[index]
        if spare:
            _, entry = spare.popitem(last=True)
            self._buckets[index][entry.peer_id] = entry

    def __contains__(self, peer_id: bytes) -> bool:
        return peer_id in self._buckets[self.bucket_index(peer_id)]

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets)

    def peers(self) -> list[bytes]:
        return [pid for bucket in self._buckets for pid in bucket]

    def closest(self, key: int, count: int, *, exclude: bytes | None = None) -> list[bytes]:
        entries = [e for bucket in self._buckets for e in bucket.values() if e.peer_id != exclude]
        entries.sort(key=lambda e: e.key ^ key)
        return [e.peer_id for e in entries[:count]]

    def stale_buckets(self, now: float, max_age: float, *, max_index: int = 12) -> list[int]:
        """Buckets to refresh: up to the deepest non-empty one (capped), not touched recently."""
        deepest = max((i for i, b in enumerate(self._buckets) if b), default=0)
        top = min(deepest + 1, max_index)
        return [i for i in range(top + 1) if now - self._bucket_touched[i] >= max_age]

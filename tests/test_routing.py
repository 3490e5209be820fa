"""Properties of the pure Kademlia routing table."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from prsm_node.kad.routing import RoutingTable, common_prefix_len, kad_key, random_key_in_bucket

ids = st.binary(min_size=34, max_size=34)


@settings(max_examples=60)
@given(local=ids, peers=st.lists(ids, max_size=120, unique=True), k=st.integers(1, 8))
def test_buckets_hold_at_most_k_and_never_self(local: bytes, peers: list[bytes], k: int) -> None:
    table = RoutingTable(local, k)
    for i, p in enumerate(peers + [local]):
        table.seen(p, float(i))
    per_bucket: dict[int, int] = {}
    for p in table.peers():
        per_bucket[table.bucket_index(p)] = per_bucket.get(table.bucket_index(p), 0) + 1
    assert all(n <= k for n in per_bucket.values())
    assert local not in table
    # every peer that was offered and is not in the table was refused only because its bucket is full
    for p in set(peers) - set(table.peers()) - {local}:
        assert per_bucket[table.bucket_index(p)] == k


@settings(max_examples=60)
@given(local=ids, peers=st.lists(ids, min_size=1, max_size=60, unique=True), target=ids, count=st.integers(1, 30))
def test_closest_matches_brute_force(local: bytes, peers: list[bytes], target: bytes, count: int) -> None:
    table = RoutingTable(local, 100)
    for p in peers:
        table.seen(p, 0.0)
    goal = kad_key(target)
    expected = sorted((p for p in peers if p != local), key=lambda p: kad_key(p) ^ goal)[:count]
    assert table.closest(goal, count) == expected


def test_failed_peer_is_replaced_by_a_spare() -> None:
    local = os.urandom(34)
    table = RoutingTable(local, 2)
    # fill one bucket past capacity
    by_bucket: dict[int, list[bytes]] = {}
    while not any(len(v) >= 3 for v in by_bucket.values()):
        p = os.urandom(34)
        by_bucket.setdefault(table.bucket_index(p), []).append(p)
    a, b, c = next(v for v in by_bucket.values() if len(v) >= 3)[:3]
    for p in (a, b, c):
        table.seen(p, 0.0)
    assert a in table and b in table and c not in table
    version = table.version
    table.failed(a)
    assert a not in table and c in table and table.version > version


def test_random_key_lands_in_the_bucket() -> None:
    local = kad_key(os.urandom(34))
    for index in (0, 1, 5, 9):
        key = random_key_in_bucket(local, index)
        assert key is not None and common_prefix_len(kad_key(key), local) == index

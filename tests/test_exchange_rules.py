"""Exchange rules between real hosts on 127.0.0.1: the store quota from ``[shards] quota_bytes``
refuses a publish and a fetch with ``quota_exceeded``; a provider far slower than another is
marked slow; a model name resolves through signed records in the real DHT on a node that never
stored the model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from prsm_node.config import Config
from prsm_node.control.server import RequestError
from prsm_node.exchange import ModelMethods
from prsm_node.exchange.registry import decode_record, record_key
from prsm_node.home import Home, init_home
from prsm_node.node import Node

from .conftest import running_nodes
from .test_exchange import CHUNK, TEST_FETCH, SlowStore, assert_identical, connect, fetch, make_model, publish, svc


@asynccontextmanager
async def nodes_with(root: Path, configs: dict[str, Config]) -> AsyncIterator[dict[str, Node]]:
    """Like ``running_nodes``, with a config of its own for each node."""
    nodes: dict[str, Node] = {}
    async with trio.open_nursery() as nursery:
        bootstrap: list[str] = []
        for name, cfg in configs.items():
            home = Home(root / name)
            init_home(home, cfg=cfg)
            node = Node(home, home.load_config(), home.load_key(), home.load_genesis(), list(bootstrap))
            ready = await nursery.start(node.run)
            bootstrap = bootstrap or [ready.addrs[0]]
            nodes[name] = node
        try:
            yield nodes
        finally:
            for node in nodes.values():
                node.stop("test finished")


def with_quota(quota: int) -> Config:
    cfg = Config.for_tests()
    cfg.shards.quota_bytes = quota
    return cfg


async def test_quota_refuses_a_publish_and_a_fetch_with_quota_exceeded(short_tmp: Path) -> None:
    src = short_tmp / "src"
    make_model(src)
    size = sum(p.stat().st_size for p in src.rglob("*.safetensors"))
    small = size // 2  # room for the manifest and some chunks, not the model
    configs = {"alice": Config.for_tests(), "bob": with_quota(small)}
    async with nodes_with(short_tmp, configs) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        assert svc(bob).store.quota == small  # from [shards] quota_bytes

        with pytest.raises(RequestError) as refused:
            await ModelMethods(svc(bob)).publish({"path": str(src), "name": "prsm/big", "version": "1",
                                                  "chunk_size": CHUNK})
        assert refused.value.code == "quota_exceeded" and "quota" in refused.value.message
        assert svc(bob).store.manifest_ids() == []  # a refused publish leaves nothing behind

        mid, _ = await publish(alice, short_tmp / "src2")
        await connect(bob, alice)
        svc(bob).fetch_params = TEST_FETCH
        with trio.fail_after(30), pytest.raises(RequestError) as refused:
            await ModelMethods(svc(bob)).fetch({"ref": mid.hex()})
        assert refused.value.code == "quota_exceeded" and "quota" in refused.value.message
        assert svc(bob).store.usage() <= small
        assert svc(bob).fetches[mid].state == "failed"


async def test_a_provider_far_slower_than_another_is_marked_slow(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, tensors = await publish(alice, short_tmp / "src")
        await fetch(bob, mid)
        slow = SlowStore(bob.home.data_dir)
        slow.delay = 0.05  # per chunk: ~1.3 MB/s against alice's tens of MB/s
        svc(bob).store = slow
        await connect(carol, bob)

        f = await fetch(carol, mid, params=replace(TEST_FETCH, slow_min_chunks=4, max_batch=4))
        by_peer = {p["peer_id"]: p for p in f.progress()["providers"]}
        fast, laggard = by_peer[str(alice.host.get_id())], by_peer[str(bob.host.get_id())]
        assert laggard["slow"] and not fast["slow"]
        assert laggard["rate_bps"] < TEST_FETCH.slow_factor * fast["rate_bps"]
        assert fast["chunks"] > laggard["chunks"] >= 4
        assert_identical(f, short_tmp / "src", tensors)


async def test_a_name_resolves_through_the_dht_on_a_node_that_never_stored_the_model(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol", "dave"]) as nodes:
        alice, dave = nodes["alice"], nodes["dave"]
        with trio.fail_after(20):
            for node in nodes.values():
                assert node.kad is not None
                await node.kad.wait_table_size(3)
        mid, tensors = await publish(alice, short_tmp / "src")
        assert svc(dave).store.manifest_ids() == []

        # The record dave reads is the signed one alice put in the DHT, under the name key.
        with trio.fail_after(30):
            value = await svc(dave).providers.get_value(record_key("prsm/test-model"))
        assert value is not None and decode_record(value).manifest_id == mid

        svc(dave).fetch_params = TEST_FETCH
        with trio.fail_after(60):
            result = await ModelMethods(svc(dave)).fetch({"ref": "prsm/test-model"})
        assert result["id"] == mid.hex() and result["state"] == "done"
        assert_identical(svc(dave).fetches[mid], short_tmp / "src", tensors)
        with trio.fail_after(30):  # name:version resolves the same way
            again = await ModelMethods(svc(dave)).fetch({"ref": "prsm/test-model:1.0.0"})
        assert again["id"] == mid.hex() and again["chunks_fetched"] == 0

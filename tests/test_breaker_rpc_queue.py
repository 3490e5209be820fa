"""CoalescingRpcQueue: what goes in comes out, in order, nothing lost, each batch within
COALESCE_BYTES (unless one RPC alone is larger), and queued RPCs are never changed."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.pubsub.pb import rpc_pb2

from prsm_node.breaker.net import COALESCE_BYTES, CoalescingRpcQueue


def _rpc(index: int, size: int, *, graft: bool = False) -> rpc_pb2.RPC:
    rpc = rpc_pb2.RPC()
    if graft:
        rpc.control.graft.add(topicID=f"t{index}")
    else:
        rpc.publish.add(data=index.to_bytes(4, "big") + b"x" * size, topicIDs=["prsm/breaker/1"])
    return rpc


def _items(rpc: rpc_pb2.RPC) -> list[str]:
    return [f"m{int.from_bytes(m.data[:4], 'big')}" for m in rpc.publish] + [
        g.topicID for g in rpc.control.graft
    ]


async def _drain(queue: CoalescingRpcQueue, expected: int) -> list[rpc_pb2.RPC]:
    batches: list[rpc_pb2.RPC] = []
    got = 0
    with trio.fail_after(5):
        while got < expected:
            rpc = await queue.pop()
            assert rpc is not None
            batches.append(rpc)
            got += len(rpc.publish) + len(rpc.control.graft)
    return batches


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=COALESCE_BYTES + 5_000), min_size=1, max_size=60))
def test_everything_comes_out_in_order_within_the_size_limit(sizes: list[int]) -> None:
    async def main() -> None:
        queue = CoalescingRpcQueue(max_size=1024)
        pushed = [_rpc(i, size) for i, size in enumerate(sizes)]
        before = [rpc.SerializeToString() for rpc in pushed]
        for rpc in pushed:
            assert queue.push(rpc)
        batches = await _drain(queue, len(sizes))
        assert [item for batch in batches for item in _items(batch)] == [f"m{i}" for i in range(len(sizes))]
        for batch in batches:
            assert len(batch.publish) == 1 or batch.ByteSize() <= COALESCE_BYTES
        assert len(queue) == 0
        assert [rpc.SerializeToString() for rpc in pushed] == before  # shared RPCs untouched

    trio.run(main)


def test_control_and_messages_merge_into_one_rpc() -> None:
    async def main() -> None:
        queue = CoalescingRpcQueue(max_size=16)
        queue.push(_rpc(0, 10))
        queue.push(_rpc(1, 0, graft=True), priority=True)
        queue.push(_rpc(2, 10))
        batch = await queue.pop()
        assert batch is not None
        assert _items(batch) == ["m0", "m2", "t1"]
        assert len(queue) == 0

    trio.run(main)


def test_pop_waits_for_a_push_and_returns_none_once_closed() -> None:
    async def main() -> None:
        queue = CoalescingRpcQueue(max_size=4)
        async with trio.open_nursery() as nursery:
            results: list[rpc_pb2.RPC | None] = []

            async def consumer() -> None:
                results.append(await queue.pop())
                results.append(await queue.pop())

            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            queue.push(_rpc(7, 3))
            await trio.testing.wait_all_tasks_blocked()
            assert len(results) == 1
            queue.close()
        assert results[1] is None

    trio.run(main)

"""The NWTN pipeline on 3 in-process nodes hosting different models: ``ask`` on a node that hosts
none answers with models of two other peers and pays exactly what the receipts say; a provider
that dies mid-task is replaced; a halted model is never routed; an over-budget query runs nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from prsm_node.agents.nwtn import OverBudget
from prsm_node.node import Node

from .test_agents_task import agent_network, balance, connect_all, fetch, publish, trained, wait_height, wait_settled

__all__ = ["trained"]


async def network_with_models(nodes: dict[str, Node], trained: Path) -> dict[str, bytes]:
    """bob: embedder + LM (fetched from carol, cheaper there); carol: classifier + LM (publisher)."""
    bob, carol = nodes["bob"], nodes["carol"]
    await connect_all(nodes)
    ids = {
        "embedder": await publish(bob, trained, "opticks-embedder"),
        "classifier": await publish(carol, trained, "opticks-classifier"),
        "lm": await publish(carol, trained, "opticks-lm"),
    }
    await fetch(bob, ids["lm"])
    assert bob.agents is not None and carol.agents is not None
    bob.agents.tasks.prices[ids["lm"]] = 10**11  # bob undercuts carol: the router picks bob
    return ids


def served(node: Node) -> int:
    assert node.agents is not None
    return int(node.agents.tasks.tasks_served)


async def test_ask_uses_two_other_peers_and_balances_move_as_the_receipts_say(
    short_tmp: Path, trained: Path
) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        ids = await network_with_models(nodes, trained)
        assert alice.chain is not None and alice.agents is not None
        supply = alice.chain.state.total_supply
        before = {n: balance(alice, nodes[n].key.account) for n in nodes}

        with trio.fail_after(60):
            answer = (await alice.agents.pipeline.ask("Why are the colours of thin plates of Light?", 10**18)).to_dict()
        trace = {row["subtask"]: row for row in answer["trace"]}
        assert all(row["error"] is None for row in trace.values()), trace
        assert trace["retrieve"]["peer"] == str(bob.host.get_id())
        assert trace["classify"]["peer"] == str(carol.host.get_id())
        assert trace["generate"]["peer"] == str(bob.host.get_id())
        assert trace["generate"]["model_id"] == ids["lm"].hex()
        assert "Topic:" in answer["answer"] and "Continuation:" in answer["answer"]
        assert "torch" not in sys.modules or alice.agents.runtime.loaded() == []  # alice ran nothing itself

        paid: dict[str, int] = {}
        for row in trace.values():
            for r in row["receipts"]:
                paid[r["payee"]] = paid.get(r["payee"], 0) + int(r["amount"])
        total = sum(paid.values())
        assert total == int(answer["cost"]) <= int(answer["estimate"]) <= 10**18
        assert paid.get(carol.key.account.hex(), 0) > 0 and paid.get(bob.key.account.hex(), 0) > 0

        await wait_settled(bob, carol)
        assert bob.chain is not None and carol.chain is not None
        await wait_height(alice, max(bob.chain.tip.height, carol.chain.tip.height))
        after = {n: balance(alice, nodes[n].key.account) for n in nodes}
        assert after["alice"] == before["alice"] - total
        assert after["bob"] == before["bob"] + paid[bob.key.account.hex()]
        assert after["carol"] == before["carol"] + paid[carol.key.account.hex()]
        assert alice.chain.state.total_supply == supply


async def test_over_budget_is_refused_before_anything_runs(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        await network_with_models(nodes, trained)
        assert alice.agents is not None
        with trio.fail_after(30), pytest.raises(OverBudget) as refused:
            await alice.agents.pipeline.ask("What is Light?", 1000)
        assert refused.value.estimate > 1000
        assert served(bob) == served(carol) == 0
        assert alice.agents.tasks.settler.held() == 0


async def test_a_halted_model_is_never_routed(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, carol = nodes["alice"], nodes["carol"]
        ids = await network_with_models(nodes, trained)
        assert alice.agents is not None and alice.breaker is not None and carol.agents is not None
        alice.breaker.is_halted = lambda mid: mid == ids["classifier"]  # type: ignore[method-assign]
        with trio.fail_after(60):
            answer = (await alice.agents.pipeline.ask("Of the Refraction of Light", 10**18)).to_dict()
        trace = {row["subtask"]: row for row in answer["trace"]}
        assert trace["classify"]["model_id"] is None and "no model" in trace["classify"]["error"]
        assert trace["classify"]["attempts"] == []
        assert ids["classifier"].hex() not in [r["model_id"] for r in trace["retrieve"]["attempts"]]
        assert trace["retrieve"]["error"] is None and trace["generate"]["error"] is None
        assert carol.agents.runtime.loaded() == [] or all(
            info.model_id != ids["classifier"].hex() for info in carol.agents.runtime.loaded())


async def test_a_provider_that_dies_mid_task_is_replaced(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        ids = await network_with_models(nodes, trained)
        await fetch(carol, ids["embedder"])  # two providers of the embedder
        assert alice.agents is not None and bob.agents is not None and carol.agents is not None
        carol.agents.tasks.prices[ids["embedder"]] = 10**13  # bob is cheaper: tried first
        started = trio.Event()

        async def hang(h: Any, inputs: Any) -> Any:
            started.set()
            await trio.sleep_forever()

        bob.agents.tasks.run_local = hang  # type: ignore[method-assign]
        result: dict[str, Any] = {}

        async def asker() -> None:
            result.update((await alice.agents.pipeline.ask("Of the Colours of Light", 10**18)).to_dict())  # type: ignore[union-attr]

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(asker)
                await started.wait()
                bob.stop("killed mid-task")
        trace = {row["subtask"]: row for row in result["trace"]}
        attempts = trace["retrieve"]["attempts"]
        assert attempts[0]["peer"] == str(bob.host.get_id()) and attempts[0]["error"] is not None
        assert trace["retrieve"]["peer"] == str(carol.host.get_id()) and trace["retrieve"]["error"] is None
        assert "Nearest passage" in result["answer"]

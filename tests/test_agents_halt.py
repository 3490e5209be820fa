"""A circuit-breaker halt cancels the tasks already running the model: on 3 in-process nodes,
carol (staked) executes alice's classify task; carol's own halt vote reaches the quorum through
the breaker's real vote path while the task waits in carol's runtime. The task is cancelled at
once, alice gets the ``halted`` error, the pipeline does not retry the model on bob (who hosts
it too), and carol unloads it."""

from __future__ import annotations

from pathlib import Path

import trio

from prsm_node.breaker.votes import Action
from prsm_node.config import Config
from prsm_node.ledger.types import Stake
from prsm_node.node import Node

from .test_agents_task import agent_network, connect_all, fetch, publish, trained, wait_height

__all__ = ["trained"]

BATCH_WAIT = 10.0  # carol's runtime holds a lone request this long, waiting for a batch to fill


def slow_batches(name: str, cfg: Config) -> None:
    if name == "carol":
        cfg.agents.max_batch_wait_s = BATCH_WAIT


async def stake(node: Node, amount: int) -> int:
    assert node.chain_net is not None and node.chain is not None
    entry = await node.chain_net.submit(body=Stake(amount))
    with trio.fail_after(30):
        return int((await node.chain.wait_committed(entry.hash)).height)


async def test_a_halt_cancels_running_tasks_and_is_not_retried_elsewhere(short_tmp: Path, trained: Path) -> None:
    async with agent_network(short_tmp, ["alice", "bob", "carol"], slow_batches) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        await connect_all(nodes)
        await wait_height(carol, await stake(carol, 100))  # carol holds all the stake: her vote halts
        clf = await publish(carol, trained, "opticks-classifier")
        await fetch(bob, clf)
        assert alice.agents is not None and bob.agents is not None and carol.agents is not None
        assert carol.breaker is not None
        bob.agents.tasks.prices[clf] = 10**13  # carol is cheaper: tried first
        carol_tasks = carol.agents.tasks
        with trio.fail_after(30):
            await carol_tasks.ensure_loaded((await carol_tasks.hosted())[clf])

        answer: dict[str, object] = {}

        async def asker() -> None:
            assert alice.agents is not None
            answer.update((await alice.agents.pipeline.ask("Of the Colours of thin Plates", 10**18)).to_dict())

        with trio.fail_after(BATCH_WAIT / 2):  # well before carol's batch would have run
            async with trio.open_nursery() as nursery:
                nursery.start_soon(asker)
                await carol_tasks.wait_until(lambda: carol_tasks.running(clf) == 1)
                await carol.breaker.vote(clf, Action.HALT, "test: unsafe outputs")
                assert carol.breaker.is_halted(clf)

        trace = {row["subtask"]: row for row in answer["trace"]}  # type: ignore[attr-defined]
        classify = trace["classify"]
        carol_peer, bob_peer = str(carol.host.get_id()), str(bob.host.get_id())
        assert [(a["peer"], a["error"]) for a in classify["attempts"]] == [(carol_peer, "halted"), (bob_peer, "halted")]
        assert "circuit breaker" in classify["attempts"][0]["message"]
        assert classify["error"] == "the model was halted by the circuit breaker" and classify["model"] is None
        assert carol_tasks.tasks_halted == 1 and carol_tasks.tasks_served == 0 and carol_tasks.running(clf) == 0
        assert carol_tasks.tasks_refused["halted"] == 1
        assert bob.agents.tasks.tasks_served == 0 and not bob.agents.tasks.tasks_refused  # never asked
        assert carol.agents.runtime.statistics().tasks_cancelled == 1
        assert all(info.model_id != clf.hex() for info in carol.agents.runtime.loaded())  # unloaded at the halt

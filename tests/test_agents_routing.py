"""Routing through DHT provider lookups, on 3 in-process nodes: bob is everyone's bootstrap peer;
carol publishes the classifier (the exchange announces her as its provider in Kademlia) and bob
fetches it, at a high price. alice is connected to bob only. Her router learns the model id from
bob's catalogue, finds carol through ``find_providers``, dials her, and routes the subtask to
her because she is cheaper."""

from __future__ import annotations

from pathlib import Path

import trio

from prsm_node.agents.nwtn.router import MISS_REFRESH_S, refresh_due

from .test_agents_task import agent_network, fetch, publish, trained

__all__ = ["trained"]


async def test_the_router_finds_a_provider_it_is_not_connected_to_through_the_dht(
    short_tmp: Path, trained: Path
) -> None:
    async with agent_network(short_tmp, ["bob", "alice", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        carol_id = carol.host.get_id()
        clf = await publish(carol, trained, "opticks-classifier")
        await fetch(bob, clf)
        assert alice.agents is not None and bob.agents is not None and carol.agents is not None
        bob.agents.tasks.prices[clf] = 10**13  # carol's default price is lower
        with trio.fail_after(10):  # Kademlia's lookups may have connected alice and carol: undo that
            while carol_id in alice.host.get_network().connections:
                await alice.host.disconnect(carol_id)
        assert carol_id not in alice.host.get_network().connections
        assert bob.host.get_id() in alice.host.get_network().connections

        with trio.fail_after(60):
            answer = (await alice.agents.pipeline.ask("Of the Colours of thin Plates", 10**18)).to_dict()
        classify = {row["subtask"]: row for row in answer["trace"]}["classify"]
        assert classify["error"] is None and classify["peer"] == str(carol_id)
        assert classify["model_id"] == clf.hex()
        via = {(row["peer"], row["model_id"]): row["via"] for row in answer["registry"]}
        assert via[(str(carol_id), clf.hex())] == "dht"
        assert via[(str(bob.host.get_id()), clf.hex())] == "connected"
        assert carol.agents.tasks.tasks_served == 1 and bob.agents.tasks.tasks_served == 0
        assert alice.agents.router.lookups >= 1


def test_a_registry_lacking_a_capability_is_refreshed_sooner_but_not_on_every_query() -> None:
    max_age = 2.0
    assert not refresh_due(10.0, 10.0 - max_age / 2, max_age=max_age, missing=False)
    assert refresh_due(10.0, 10.0 - max_age, max_age=max_age, missing=False)
    # A capability a query needs is missing (a model published since?): refreshed sooner...
    assert refresh_due(10.0, 10.0 - MISS_REFRESH_S, max_age=max_age, missing=True)
    # ... but a network that lacks it does not refresh on every query.
    assert not refresh_due(10.0, 10.0 - MISS_REFRESH_S / 2, max_age=max_age, missing=True)

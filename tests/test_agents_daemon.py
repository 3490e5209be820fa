"""Real daemons: a 3-node devnet where node1 and node2 host the models and ``prsm-node ask`` on
node0 (which hosts none) answers through them; ``agents status`` reports the tasks served."""

from __future__ import annotations

import json
from pathlib import Path

from .daemons import cli, control, devnet
from .test_agents_task import trained

__all__ = ["trained"]


def test_ask_and_agents_status_through_the_cli(short_tmp: Path, trained: Path) -> None:
    with devnet(short_tmp / "net", 3) as net:
        n0, n1, n2 = net.nodes
        nothing = cli("ask", "Of Light", "--home", n2["home"], timeout=60)  # no model published yet
        assert nothing.returncode == 1 and "no model on the network could answer" in nothing.stderr
        assert "generate: no model with capability 'text-generation' is reachable" in nothing.stderr
        for node, name in ((n1, "opticks-embedder"), (n1, "opticks-lm"), (n2, "opticks-classifier")):
            doc = json.loads((trained / name / "spec.json").read_text())
            control(node["home"], "model.publish", path=str(trained / name), name=name, version="1",
                    tags=doc["tags"], metadata={"architecture": doc["architecture"]})
        out = cli("ask", "Of the colours of thin plates", "--budget", "1", "--json", "--home", n0["home"],
                  timeout=120)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        peers = {row["subtask"]: row["peer"] for row in answer["trace"]}
        assert peers == {"retrieve": n1["peer_id"], "classify": n2["peer_id"], "generate": n1["peer_id"]}
        assert int(answer["cost"]) > 0 and "Topic:" in answer["answer"]

        status = cli("agents", "status", "--json", "--home", n1["home"])
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert st["tasks"]["tasks_served"] == 2 and len(st["hosted"]) == 2
        human = cli("agents", "status", "--home", n0["home"])
        assert human.returncode == 0 and "tasks served 0" in human.stdout

        human_ask = cli("ask", "Of Light", "--budget", "0.5", "--home", n0["home"], timeout=120)
        assert human_ask.returncode == 0 and "budget 0.5)" in human_ask.stdout  # in FTNS, not units
        over = cli("ask", "Of Light", "--budget", "0.000000000000000001", "--home", n0["home"])
        assert over.returncode == 1 and "exceeds the budget" in over.stderr

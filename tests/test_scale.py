"""Scale: a devnet of real daemons where every node resolves every other.

Marked slow. CI runs it bounded (PRSM_SCALE_NODES, default 12); run the full form with
PRSM_SCALE_NODES=50 (or use scripts/bench/discovery.py for figures).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prsm_node.control.client import ControlClient

from .conftest import env_int
from .daemons import devnet


@pytest.mark.slow
def test_every_daemon_resolves_every_other(short_tmp: Path) -> None:
    n = env_int("PRSM_SCALE_NODES", 12)
    with devnet(short_tmp / "dn", n, ready_timeout=120) as net:

        def resolve_all(a: dict) -> list[str]:
            missing = []
            with ControlClient(Path(a["control"]), timeout=60) as client:
                for b in net.nodes:
                    if b is a:
                        continue
                    found = client.call("find_peer", {"peer_id": b["peer_id"], "lookup": True})
                    if b["addr"].split("/p2p/")[0] not in found["addrs"]:
                        missing.append(b["peer_id"])
            return missing

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(resolve_all, net.nodes))
        assert all(not missing for missing in results), results
        for node in net.nodes:
            with ControlClient(Path(node["control"])) as client:
                assert client.call("status")["routing_table_size"] >= min(n - 1, 20)

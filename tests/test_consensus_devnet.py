"""PBFT in real daemons, through the CLI: a devnet of 4 validators and a follower commits
transfers, survives a SIGKILLed validator (which catches up after a restart) and the loss of
its primary (view change); a validator with a test fault does not stop progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from prsm_node.control.client import ControlClient

from .daemons import CLI, _close_pipes, cli, control, daemon, readline, wait_lock_released

CONFIRM = 30.0


@contextmanager
def pbft_devnet(directory: Path, nodes: int, validators: int, *faults: str) -> Iterator[list[dict[str, Any]]]:
    args = ["devnet", "--nodes", str(nodes), "--validators", str(validators), "--dir", str(directory), "--json"]
    for f in faults:
        args += ["--test-fault", f]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = readline(proc, 120)
        if not line:
            raise RuntimeError(f"devnet failed: {proc.stderr.read() if proc.stderr else ''}")
        yield json.loads(line)["nodes"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            _close_pipes(proc)


def call(home: str, method: str, params: dict[str, Any], wait: float) -> Any:
    """A control call whose own ``timeout`` param bounds the daemon-side wait."""
    with ControlClient(Path(home) / "control.sock", timeout=wait + 10) as client:
        return client.call(method, {**params, "timeout": wait})


def transfer(home: str, to: str, amount: str = "1") -> int:
    result = call(home, "ledger.transfer", {"to": to, "amount": amount}, CONFIRM)
    assert result["status"] == "committed", result
    return int(result["height"])


def same_state(homes: list[str], height: int) -> str:
    """Every node reaches ``height`` and they all hold the same block and state there."""
    for h in homes:
        call(h, "ledger.wait_height", {"height": height}, CONFIRM)
    seen = set()
    for h in homes:
        st = control(h, "ledger.status")
        block = control(h, "ledger.block", height=height)
        seen.add((block["hash"], block["state_hash"]))
        assert st["height"] >= height
    assert len(seen) == 1, seen
    return seen.pop()[1]


def sigkill(node: dict[str, Any]) -> None:
    os.kill(node["pid"], signal.SIGKILL)
    wait_lock_released(node["home"])


def test_four_validators_commit_survive_a_crash_a_restart_and_the_loss_of_the_primary(short_tmp: Path) -> None:
    with pbft_devnet(short_tmp / "dn", 5, 4) as nodes:
        homes = [n["home"] for n in nodes]
        follower = homes[4]
        to = control(homes[2], "id")["account"]

        # A backup sends its client's tx to the primary alone; the other backups get it in the
        # PRE-PREPARE, not over /prsm/tx.
        h0 = transfer(homes[1], to)
        same_state(homes[:4], h0)
        status = [control(h, "ledger.status") for h in homes[:4]]
        received = [st["txs_received"] for st in status]
        assert received[0] >= 1 and received[2] == received[3] == 0, received
        # ... whose signatures they check on their verifier, not on the event loop
        assert all(st["signatures_verified"] >= 1 for st in status[2:]), status

        # A follower's transfer goes to the validators, commits through PBFT, syncs back.
        h1 = transfer(follower, to)
        same_state(homes, h1)
        result = cli("consensus", "status", "--home", homes[1], "--json")
        assert result.returncode == 0, result.stderr
        st = json.loads(result.stdout)
        assert st["enabled"] and st["view"] == 0 and st["height"] >= h1
        assert [v["peer_id"] for v in st["validators"]] == [n["peer_id"] for n in nodes[:4]]
        assert st["validators"][0]["primary"] and st["validators"][1]["self"]
        assert all(v["last_heard"] is not None for v in st["validators"] if not v["self"])
        assert not json.loads(cli("consensus", "status", "--home", follower, "--json").stdout)["enabled"]
        assert control(follower, "ledger.status")["bad_blocks"] == 0

        # f = 1: with one backup SIGKILLed, transfers still commit.
        sigkill(nodes[3])
        h2 = transfer(follower, to)
        same_state(homes[:3] + [follower], h2)

        # Restarted, it catches up to the same state.
        with daemon(Path(homes[3]), timeout=60):
            h3 = transfer(follower, to)
            same_state(homes, h3)
            assert control(homes[3], "consensus.status")["enabled"]

            # The primary dies: the others change views and go on.
            sigkill(nodes[0])
            h4 = transfer(follower, to)
            same_state(homes[1:], h4)
            st = control(homes[1], "consensus.status")
            assert st["view"] >= 1 and not st["validators"][0]["primary"]
            for h in homes[1:]:
                assert control(h, "ledger.verify", 60)["ok"]


@pytest.mark.parametrize("fault", ["equivocate", "silent", "bad-signatures"])
def test_a_faulty_primary_does_not_stop_progress(short_tmp: Path, fault: str) -> None:
    with pbft_devnet(short_tmp / "dn", 4, 4, f"node0={fault}") as nodes:
        homes = [n["home"] for n in nodes]
        to = control(homes[1], "id")["account"]
        assert control(homes[0], "consensus.status")["test_fault"] == fault
        h1 = transfer(homes[3], to)
        h2 = transfer(homes[2], to)
        assert h2 > h1
        same_state(homes[1:], h2)
        st = control(homes[1], "consensus.status")
        assert st["view"] >= 1 and not st["validators"][0]["primary"]  # the faulty primary was replaced
        if fault == "bad-signatures":
            assert st["validators"][0]["invalid_messages"] > 0
        if fault != "bad-signatures":
            same_state(homes, h2)  # the faulty one executes what the others commit

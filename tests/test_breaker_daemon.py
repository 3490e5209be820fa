"""The circuit breaker in 8 real daemon processes (a devnet through the CLI): `breaker vote`
and `breaker status --json`; two of eight equal stakes do not halt, three do, on every node;
a halt survives a restart; a resume quorum lifts it everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .daemons import cli, control, daemon, devnet, wait_lock_released

MODEL = "ab" * 32
N = 8


def breaker_json(home: str | Path, *args: str) -> Any:
    result = cli("breaker", *args, "--home", str(home), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_vote_halt_restart_resume_through_the_cli(short_tmp: Path) -> None:
    with devnet(short_tmp / "dn", N) as net:
        homes = [n["home"] for n in net.nodes]
        unstaked = cli("breaker", "vote", MODEL, "--halt", "--home", homes[0])
        assert unstaked.returncode == 1 and "has no stake" in unstaked.stderr
        assert "prsm-node ledger stake" in unstaked.stderr  # says how to get a vote
        heights = [control(h, "ledger.stake", amount="100", timeout=60)["height"] for h in homes]
        for h in homes:
            control(h, "ledger.wait_height", height=max(heights), timeout=60.0)
            control(h, "breaker.wait_mesh", peers=1, timeout=60.0)

        # 2 x 100 of 800 is under 1/3: counted everywhere, halted nowhere (but self-halted).
        for h in homes[:2]:
            voted = breaker_json(h, "vote", MODEL, "--halt", "--reason", "jailbreak found")
            assert voted["state"] == "halted" and voted["self_halted"] is True
        for h in homes:
            control(h, "breaker.wait_votes", count=2, timeout=30.0)
        for h in homes[2:]:
            st = breaker_json(h, "status", MODEL)
            assert st["state"] == "running" and st["halt_stake"] == str(200 * 10**18), st

        # The third reaches the threshold: halted on every node.
        breaker_json(homes[2], "vote", MODEL, "--halt", "--reason", "confirmed")
        for h in homes:
            st = control(h, "breaker.wait_state", model=MODEL, state="halted", timeout=30.0)
            assert st["network_state"] == "halted" and len(st["voters"]) == 3
        listed = breaker_json(homes[5], "status")
        assert [m["model"] for m in listed["models"]] == [MODEL]

        # A halt survives a restart (node 7, stopped and started again from its home).
        control(homes[7], "stop")
        wait_lock_released(homes[7])
        with daemon(Path(homes[7])):
            st = breaker_json(homes[7], "status", MODEL)
            assert st["state"] == "halted" and st["halted_since_ms"] is not None
            text = cli("breaker", "status", MODEL, "--home", homes[7])
            assert text.returncode == 0 and "HALTED" in text.stdout
            assert "halt    300 FTNS of 800 FTNS" in text.stdout  # stakes in FTNS, as the ledger commands

            # 6 x 100 of 800 reaches 2/3 (534): running everywhere, self-halts lifted.
            control(homes[7], "breaker.wait_mesh", peers=1, timeout=60.0)
            for h in homes[2:]:
                breaker_json(h, "vote", MODEL, "--resume", "--reason", "patched")
            for h in homes:
                st = control(h, "breaker.wait_state", model=MODEL, state="running", timeout=30.0)
                assert st["self_halted"] is False

        bad = cli("breaker", "vote", MODEL, "--home", homes[0])
        assert bad.returncode == 2 and "exactly one" in bad.stderr

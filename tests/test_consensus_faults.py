"""PBFT under load and faults in real daemons: a devnet of 4 validators and 2 followers
commits many transfers, stalls (without diverging) with two validators down and resumes when
one returns, catches up a follower that was offline for many blocks, and records evidence
against an equivocating validator.

``PRSM_CONSENSUS_TRANSFERS`` (default 200) and ``PRSM_CONSENSUS_OFFLINE_BLOCKS`` (default 50)
scale the first and third tests (1000 and 500 for a long run)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from prsm_node.control.client import ControlError

from .daemons import cli, control, daemon, wait_lock_released
from .test_consensus_devnet import CONFIRM, call, pbft_devnet, same_state, sigkill, transfer

TRANSFERS = int(os.environ.get("PRSM_CONSENSUS_TRANSFERS", "200"))
OFFLINE_BLOCKS = int(os.environ.get("PRSM_CONSENSUS_OFFLINE_BLOCKS", "50"))
WINDOW = 32  # transfers in flight per follower: half of a mempool's per-sender limit (64)


def genesis_supply(home: str) -> int:
    st = control(home, "ledger.status")
    return int(st["total_supply"]["units"]) - int(st["minted"]["units"])


def agree(homes: list[str]) -> tuple[int, str, str]:
    """Every node is at the highest tip any of them has, with the same block and state."""
    top = max(control(h, "ledger.status")["height"] for h in homes)
    for h in homes:
        call(h, "ledger.wait_height", {"height": top}, CONFIRM)
    tips = {(st["height"], st["block_hash"], st["state_hash"]) for st in (control(h, "ledger.status") for h in homes)}
    assert len(tips) == 1, tips
    return tips.pop()


def send_many(home: str, to: str, count: int) -> list[str]:
    """``count`` transfers, ``WINDOW`` at a time: all but the last of a window with
    ``wait: false``; the last one waits, and one sender's txs commit in nonce order."""
    hashes: list[str] = []
    while len(hashes) < count:
        n = min(WINDOW, count - len(hashes))
        for _ in range(n - 1):
            r = call(home, "ledger.transfer", {"to": to, "amount": "1", "wait": False}, CONFIRM)
            assert r["status"] == "pending", r
            hashes.append(r["hash"])
        r = call(home, "ledger.transfer", {"to": to, "amount": "1", "wait": True}, 60)
        assert r["status"] == "committed", r
        hashes.append(r["hash"])
    return hashes


def test_many_transfers_from_two_followers_leave_every_node_in_the_same_state(short_tmp: Path) -> None:
    with pbft_devnet(short_tmp / "dn", 6, 4) as nodes:
        homes = [n["home"] for n in nodes]
        followers = homes[4:]
        supply = genesis_supply(homes[0])
        to = control(homes[1], "id")["account"]
        half = TRANSFERS // 2
        results: dict[str, list[str]] = {}
        errors: list[BaseException] = []

        def run(home: str, count: int) -> None:
            try:
                results[home] = send_many(home, to, count)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(followers[0], half)),
            threading.Thread(target=run, args=(followers[1], TRANSFERS - half)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
            assert not t.is_alive(), "transfers did not finish in 600 s"
        assert not errors, errors
        hashes = [x for f in followers for x in results[f]]
        assert len(set(hashes)) == TRANSFERS

        # Every transfer is committed, and every node has it.
        height, _, _ = agree(homes)
        for h in homes:
            committed = {call(h, "ledger.tx", {"hash": x}, CONFIRM)["status"] for x in hashes[-WINDOW:] + hashes[:3]}
            assert committed == {"committed"}
        for h in homes:
            assert genesis_supply(h) == supply
            assert control(h, "ledger.status")["bad_blocks"] == 0
            assert control(h, "ledger.verify", 120)["ok"]
        assert height >= 2


def test_two_validators_down_stall_without_divergence_and_resume_after_one_restarts(short_tmp: Path) -> None:
    with pbft_devnet(short_tmp / "dn", 6, 4) as nodes:
        homes = [n["home"] for n in nodes]
        follower = homes[4]
        to = control(homes[1], "id")["account"]
        same_state(homes, transfer(follower, to))

        # 2 of 4 down (more than f = 1): nothing commits, and nobody goes its own way.
        sigkill(nodes[2])
        sigkill(nodes[3])
        live = homes[:2] + homes[4:]
        before = agree(live)
        with pytest.raises(ControlError) as err:
            call(follower, "ledger.transfer", {"to": to, "amount": "1", "wait": True}, 5)
        assert err.value.code == "timeout", err.value
        stuck = str(err.value).split("tx ", 1)[1].split()[0]
        assert control(follower, "ledger.tx", hash=stuck)["status"] == "pending"
        assert agree(live) == before

        # One returns: a quorum again; the pending transfer commits and everyone agrees.
        with daemon(Path(homes[3]), timeout=60):
            back = homes[:2] + homes[3:]
            call(follower, "ledger.wait_height", {"height": before[0] + 1}, 90)
            same_state(back, transfer(follower, to))  # after the stuck one (the next nonce)
            for x in back:
                assert control(x, "ledger.tx", hash=stuck)["status"] == "committed"
            agree(back)
            for x in back:
                assert control(x, "ledger.verify", 60)["ok"]


def test_a_follower_offline_for_many_blocks_catches_up(short_tmp: Path) -> None:
    with pbft_devnet(short_tmp / "dn", 6, 4) as nodes:
        homes = [n["home"] for n in nodes]
        sender, offline = homes[4], homes[5]
        to = control(homes[1], "id")["account"]
        start = same_state(homes, transfer(sender, to))
        assert start

        result = cli("stop", "--home", offline)
        assert result.returncode == 0, result.stderr
        wait_lock_released(offline)
        gone_at = control(homes[0], "ledger.status")["height"]

        height = gone_at
        while height < gone_at + OFFLINE_BLOCKS:
            height = transfer(sender, to)
        others = homes[:5]
        tip = agree(others)

        with daemon(Path(offline), timeout=60):
            call(offline, "ledger.wait_height", {"height": tip[0]}, 120)
            assert agree(homes)[0] >= tip[0]
            assert control(offline, "ledger.block", height=tip[0])["hash"] == tip[1]
            assert control(offline, "ledger.verify", 60)["ok"]


def test_honest_validators_keep_evidence_against_an_equivocating_validator(short_tmp: Path) -> None:
    with pbft_devnet(short_tmp / "dn", 6, 4, "node0=equivocate") as nodes:
        homes = [n["home"] for n in nodes]
        to = control(homes[1], "id")["account"]
        honest = homes[1:4]
        h = 0
        for _ in range(3):
            h = transfer(homes[4], to)
        same_state(homes[1:], h)

        def evidence(home: str) -> list[Any]:
            return [v["evidence"] for v in control(home, "consensus.status")["validators"]]

        seen = [evidence(x) for x in honest]
        # Only a validator that receives both versions (directly or in a view change) can tell.
        assert any(e[0] > 0 for e in seen), seen
        assert all(e[1:] == [0, 0, 0] for e in seen), seen  # never against an honest validator

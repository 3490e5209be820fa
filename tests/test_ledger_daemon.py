"""The ledger in real daemon processes, through the CLI and the control socket: a follower's
transfer reaches the validator and comes back in a synced block; every ledger command with
--json; and a validator SIGKILLed again and again while transfers flow loses nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from prsm_node.config import Config
from prsm_node.control.client import ControlClient
from prsm_node.exceptions import ControlError, DaemonNotRunning
from prsm_node.home import Home, init_home

from .conftest import env_int
from .daemons import CLI, cli, control, devnet, readline, wait_lock_released


def ledger_json(home: str | Path, *args: str) -> Any:
    result = cli("ledger", *args, "--home", str(home), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_follower_transfer_is_forwarded_committed_and_synced(short_tmp: Path) -> None:
    with devnet(short_tmp / "dn", 3) as net:
        homes = [n["home"] for n in net.nodes]
        accounts = [control(h, "id")["account"] for h in homes]
        assert ledger_json(homes[0], "status")["role"] == "validator"
        assert ledger_json(homes[1], "status")["role"] == "follower"

        sent = ledger_json(homes[1], "transfer", accounts[2], "2.5", "--fee", "0.001")
        assert sent["status"] == "committed" and sent["kind"] == "transfer"
        height = sent["height"]
        # The sender's own node confirmed it from its own (synced) ledger; the others follow.
        for h in homes:
            control(h, "ledger.wait_height", height=height, timeout=30.0)
        statuses = [ledger_json(h, "status") for h in homes]
        assert len({(s["height"], s["state_hash"], s["block_hash"]) for s in statuses}) == 1
        supply = {"ftns": "3000000", "units": str(3 * 10**24)}
        assert statuses[0]["total_supply"] == statuses[2]["total_supply"] == supply

        balance = ledger_json(homes[2], "balance")
        assert balance["balance"]["ftns"] == "1000002.5"
        payer = ledger_json(homes[0], "balance", accounts[1])
        assert payer["balance"]["ftns"] == "999997.499" and payer["nonce"] == 1

        tx = ledger_json(homes[2], "tx", sent["hash"])
        assert (tx["status"], tx["height"], tx["to"], tx["amount"]["ftns"]) == ("committed", height, accounts[2], "2.5")
        block = ledger_json(homes[1], "block", str(height))
        assert [t["hash"] for t in block["txs"]] == [sent["hash"]]
        assert block["proposer"] == accounts[0]
        header = control(homes[1], "ledger.block", height=height, txs=False)
        assert "txs" not in header and header == {k: v for k, v in block.items() if k != "txs"}
        history = ledger_json(homes[2], "history")  # this node's account by default
        assert [t["hash"] for t in history["txs"]] == [sent["hash"]]
        assert ledger_json(homes[0], "history", accounts[2]) == history

        staked = ledger_json(homes[2], "stake", "100")
        assert staked["status"] == "committed"
        unstaked = ledger_json(homes[2], "unstake", "40")
        control(homes[2], "ledger.wait_height", height=unstaked["height"], timeout=30.0)
        mine = ledger_json(homes[2], "balance")
        assert mine["stake"]["ftns"] == "60"
        assert [u["amount"]["ftns"] for u in mine["unbonding"]] == ["40"]
        # Blocks go on while stake unbonds (10 blocks by default), then it is released.
        release = mine["unbonding"][0]["release_height"]
        control(homes[2], "ledger.wait_height", height=release, timeout=60.0)
        assert ledger_json(homes[2], "balance")["unbonding"] == []
        for h in homes:
            assert ledger_json(h, "verify")["ok"] is True
        # Each follower long-polled the validator for every block on one reused stream
        # (a fresh stream per round opened one per block).
        for h in homes[1:]:
            status = ledger_json(h, "status")
            assert status["blocks_synced"] >= 10 and status["sync_streams_opened"] <= 2, status


def test_bad_requests_get_clear_errors_and_the_node_runs_on(short_tmp: Path) -> None:
    with devnet(short_tmp / "dn", 1) as net:
        home = net.nodes[0]["home"]
        cases = [
            (["transfer", "00", "1"], "to must be 64 hex"),
            (["transfer", "ab" * 32, "1.0000000000000000001"], "at most 18 decimals"),
            (["transfer", "ab" * 32, "1e5"], "plain decimal"),
            (["transfer", "ab" * 32, str(2**128)], "exceeds the maximum"),
            (["transfer", "ab" * 32, "0"], "must be positive"),
            (["transfer", "ab" * 32, "5000000"], "does not cover"),
            (["unstake", "1"], "does not cover unstake"),
            (["tx", "ab" * 32], "no tx"),
            (["block", "99"], "no block 99"),
            (["block"], "the ledger has no block yet"),
            (["history", "xyz"], "64 hex"),
        ]
        for args, message in cases:
            result = cli("ledger", *args, "--home", home)
            assert result.returncode == 1, (args, result.stdout)
            assert message in result.stderr, (args, result.stderr)
        for bad, code in [("zz", "invalid_params"), ("c1", "malformed"), ("9400000000", "malformed")]:
            try:
                control(home, "ledger.submit", tx=bad)
            except ControlError as exc:
                assert exc.code == code, (bad, exc.code, exc.message)
            else:
                raise AssertionError(f"{bad} was accepted")
        assert ledger_json(home, "status")["height"] == 0
        assert control(home, "status")["peer_id"]


# ------------------------------------------------------------ crash test


class Client(threading.Thread):
    """Sends transfers through the control socket until the daemon dies; records the ones
    the daemon confirmed as committed (hash, height)."""

    def __init__(self, home: Path, to: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.home, self.to, self.rng = home, to, random.Random(seed)
        self.confirmed: list[tuple[str, int]] = []
        self.first = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with ControlClient(self.home / "control.sock", timeout=30) as client:
                while True:
                    amount = f"0.{self.rng.randrange(1, 10**6):06d}"
                    result = client.call("ledger.transfer", {"to": self.to, "amount": amount, "timeout": 20.0})
                    self.confirmed.append((result["hash"], result["height"]))
                    self.first.set()
        except (OSError, ControlError, DaemonNotRunning, TimeoutError, json.JSONDecodeError) as exc:
            self.error = exc  # the daemon was killed under us (or a bug: shown if none confirmed)


def start_daemon(home: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*CLI, "start", "--home", str(home)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    line = readline(proc, 60)
    assert line.startswith("prsm-node ready"), line
    return proc


def test_sigkill_while_transfers_flow_loses_no_committed_tx(short_tmp: Path) -> None:
    rounds = env_int("PRSM_CRASH_ROUNDS", 4)
    rng = random.Random(env_int("PRSM_CRASH_SEED", 1234))
    home = Home(short_tmp / "v")
    cfg = Config.for_tests()
    cfg.ledger.block_interval = 0.02
    init_home(home, cfg=cfg)
    to = "cd" * 32
    confirmed: dict[str, int] = {}
    last_height = 0
    for r in range(rounds):
        proc = start_daemon(home.path)
        try:
            status = control(home.path, "ledger.status")
            # Nothing committed is lost, nothing uncommitted appears: height never goes back...
            assert status["height"] >= last_height
            # ...every confirmed tx is still where the daemon said it was...
            for digest, height in confirmed.items():
                assert control(home.path, "ledger.tx", hash=digest)["height"] == height
            # ...and the stored state equals a fresh replay of the stored blocks.
            verdict = control(home.path, "ledger.verify", timeout=120)
            assert verdict["ok"] and verdict["height"] == status["height"], verdict
            clients = [Client(home.path, to, seed=r * 10 + i) for i in range(3)]
            for c in clients:
                c.start()
            for c in clients:
                assert c.first.wait(30), f"no transfer was confirmed: {c.error!r}"
            # Kill at a random moment while txs flow (fault injection, not a wait).
            threading.Event().wait(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            for c in clients:
                c.join(timeout=30)
                confirmed.update(c.confirmed)
            last_height = max([last_height, *(h for _, h in confirmed.items())])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()
        wait_lock_released(home.path)
    assert len(confirmed) >= rounds

    # Finally, with the daemon stopped, replay independently of the daemon's own code path.
    from prsm_node.ledger.storage import LedgerStore
    from prsm_node.store import Store

    store = Store(home.data_dir / "db")
    store.open()
    try:
        ledger = LedgerStore(store.namespace("ledger"), home.load_genesis())
        state, tip = ledger.load()
        assert tip.height >= last_height
        assert ledger.replay().state_hash() == state.state_hash()
        for digest, height in confirmed.items():
            where = ledger.locate(bytes.fromhex(digest))
            assert where is not None and where.height == height
        print(f"crash test: {rounds} SIGKILLs, {len(confirmed)} confirmed txs all kept, final height {tip.height}")
    finally:
        store.close()

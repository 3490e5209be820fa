"""Real prsm-node processes driven through the control socket."""

from __future__ import annotations

import itertools
import signal
import socket
from pathlib import Path

import pytest

from prsm_node.home import Home, init_home

from .daemons import cli, control, daemon, devnet, wait_lock_released


def test_devnet_daemons_find_each_other_and_a_restarted_node_rejoins(short_tmp: Path) -> None:
    with devnet(short_tmp / "dn", 5) as net:
        nodes = net.nodes
        # every node resolves every other through the control socket
        for a, b in itertools.permutations(nodes, 2):
            found = control(a["home"], "find_peer", peer_id=b["peer_id"])
            assert found["peer_id"] == b["peer_id"]
            assert b["addr"].split("/p2p/")[0] in found["addrs"]
        for n in nodes:
            st = control(n["home"], "status")
            assert st["peer_id"] == n["peer_id"] and st["network"] == "devnet"
            assert st["routing_table_size"] == 4

        # restart node3 while the bootstrap node0 is down: it rejoins from its saved peers
        node0, node3, node4 = nodes[0], nodes[3], nodes[4]
        for n in (node3, node0):
            assert control(n["home"], "stop") == {"stopping": True}
            wait_lock_released(n["home"])
        with daemon(Path(node3["home"])) as (proc, ready):
            assert f"peer_id={node3['peer_id']}" in ready
            table = control(node3["home"], "wait_routing_table", size=3, timeout=20)
            assert table["routing_table_size"] >= 3
            assert control(node3["home"], "find_peer", peer_id=node4["peer_id"])["addrs"]
            # a second daemon on the same home is refused, the first keeps running
            second = cli("start", "--home", node3["home"])
            assert second.returncode == 1
            assert "already running" in second.stderr
            assert control(node3["home"], "id")["peer_id"] == node3["peer_id"]
            # SIGTERM stops it cleanly
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ("[p2p]\nlisen = []\n", "[p2p].lisen"),
        ('[p2p]\nlisten = ["/ip4/300.1.1.1/tcp/1"]\n', "[p2p].listen[0]"),
        ('[discovery]\nalpha = "three"\n', "[discovery].alpha"),
        ("[p2p\n", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(short_tmp: Path, config: str, names: str) -> None:
    home = Home(short_tmp / "h")
    init_home(home)
    home.config_path.write_text(config)
    result = cli("start", "--home", str(home.path))
    assert result.returncode == 2, result.stderr
    assert names in result.stderr


def test_bad_flag_exits_2(short_tmp: Path) -> None:
    result = cli("start", "--home", str(short_tmp / "h"), "--listen", "/ip4/127.0.0.1/udp/1")
    assert result.returncode == 2 and "--listen[0]" in result.stderr
    assert cli("start", "--no-such-flag").returncode == 2


def test_commands_without_a_daemon_say_how_to_start_one(short_tmp: Path) -> None:
    for command in ("status", "id", "peers", "stop"):
        result = cli(command, "--home", str(short_tmp))
        assert result.returncode == 1
        assert "no prsm-node is running" in result.stderr and "prsm-node start" in result.stderr


def test_start_with_no_home_creates_one_and_init_refuses_to_overwrite(short_tmp: Path) -> None:
    home = short_tmp / "fresh"
    with daemon(home, "--listen", "/ip4/127.0.0.1/tcp/0") as (proc, ready):
        assert (home / "keys" / "node_key").exists()
        peer_id = control(home, "id")["peer_id"]
        assert f"peer_id={peer_id}" in ready and f"control={home}/control.sock" in ready
        status = cli("status", "--home", str(home), "--json")
        assert status.returncode == 0 and f'"peer_id": "{peer_id}"' in status.stdout
        plain = cli("status", "--home", str(home)).stdout.splitlines()
        assert plain[0].split() == ["peer", "id", peer_id]  # a key/value list has no header line
        assert cli("stop", "--home", str(home)).returncode == 0
        assert proc.wait(timeout=30) == 0
    refused = cli("init", "--home", str(home))
    assert refused.returncode == 2 and "--force" in refused.stderr


def test_busy_port_and_corrupt_store_fail_clearly(short_tmp: Path) -> None:
    home = Home(short_tmp / "h")
    init_home(home)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("start", "--home", str(home.path), "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert result.returncode == 1 and "prsm-node ready" not in result.stdout
    assert f"cannot listen on /ip4/127.0.0.1/tcp/{port}" in result.stderr
    db = home.data_dir / "db"
    db.mkdir(parents=True, exist_ok=True)
    (db / "CURRENT").write_text("garbage\n")
    result = cli("start", "--home", str(home.path), "--listen", "/ip4/127.0.0.1/tcp/0")
    assert result.returncode == 1
    assert "the database is corrupt" in result.stderr and "Traceback" not in result.stderr

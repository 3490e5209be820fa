"""Metrics over loopback HTTP and machine-readable logs."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from prsm_node.config import Config

from .conftest import running_nodes
from .daemons import cli, daemon


async def _http_get(port: int, path: str) -> tuple[str, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_metrics_are_served_on_loopback(short_tmp: Path) -> None:
    cfg = Config.for_tests()
    cfg.metrics.enabled = True
    cfg.metrics.listen = "127.0.0.1:0"
    async with running_nodes(short_tmp, ["alice", "bob"], cfg=cfg) as nodes:
        alice = nodes["alice"]
        assert alice.kad is not None and alice.metrics is not None and alice.metrics.bound_port
        with trio.fail_after(10):
            await alice.kad.wait_table_size(1)
            status, body = await _http_get(alice.metrics.bound_port, "/metrics")
            missing, _ = await _http_get(alice.metrics.bound_port, "/")
        assert status == "HTTP/1.1 200 OK" and missing == "HTTP/1.1 404 Not Found"
        values = {line.split()[0]: float(line.split()[1]) for line in body.splitlines() if not line.startswith("#")}
        assert values["prsm_connected_peers"] >= 1 and values["prsm_routing_table_size"] >= 1
        assert values["prsm_protocol_bytes_in_total"] > 0 and values["prsm_protocol_bytes_out_total"] > 0
        assert "prsm_open_streams" in values and "# TYPE prsm_kad_lookups_total counter" in body


def test_json_logs_are_one_object_a_line(short_tmp: Path) -> None:
    home = short_tmp / "h"
    with daemon(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--log-format", "json") as (proc, _):
        assert cli("stop", "--home", str(home)).returncode == 0
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        lines = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
    records = [json.loads(line) for line in lines[1:]]  # line 0: "initialised a new node home"
    assert {"node ready", "stopping", "store closed", "node stopped"} <= {r["msg"] for r in records}
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    # py-libp2p's routine chatter is kept out of the node's log at the default level
    assert not [r for r in records if r["logger"].startswith("libp2p")]

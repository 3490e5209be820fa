"""The control socket, spoken raw: structured errors for every kind of bad request."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import trio

from prsm_node.config import Config

from .conftest import running_nodes


class Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, raw: bytes) -> None:
        await self.stream.send_all(raw)

    async def reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            assert chunk, "daemon closed the control connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        await self.send(json.dumps({"id": 7, "method": method, "params": params}).encode() + b"\n")
        return await self.reply()


async def test_bad_requests_get_structured_errors_and_the_daemon_keeps_serving(short_tmp: Path) -> None:
    cfg = Config.for_tests()
    cfg.control.max_request_bytes = 1024
    async with running_nodes(short_tmp, ["alice"], cfg=cfg) as nodes:
        alice = nodes["alice"]
        sock = alice.home.control_socket
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with trio.fail_after(10):
            conn = Conn(await trio.open_unix_socket(str(sock)))
            cases = [
                (b"{not json\n", "parse_error"),
                (b"\xff\xfe\n", "parse_error"),
                (b"[1, 2]\n", "invalid_request"),
                (b'{"id": 1}\n', "invalid_request"),
                (b'{"id": [1], "method": "status"}\n', "invalid_request"),
                (b'{"id": 1, "method": "status", "params": 5}\n', "invalid_request"),
                (b'{"id": 1, "method": "launch_missiles"}\n', "unknown_method"),
                (b'{"id": 1, "method": "find_peer", "params": {}}\n', "invalid_params"),
                (b'{"id": 1, "method": "find_peer", "params": {"peer_id": 5}}\n', "invalid_params"),
                (b'{"id": 1, "method": "find_peer", "params": {"peer_id": "not-a-peer"}}\n', "invalid_params"),
                (
                    b'{"id": 1, "method": "wait_routing_table", "params": {"size": 1, "timeout": -1}}\n',
                    "invalid_params",
                ),
                (b'{"id": 1, "method": "wait_routing_table", "params": {"size": 5, "timeout": 0.05}}\n', "timeout"),
                (b"x" * 5000 + b"\n", "request_too_large"),
            ]
            cases += [
                (b'{"id": true, "method": "status"}\n', "invalid_request"),
                (b'{"id": 1, "method": "find_peer", "params": {"peer_id": "abc"}}\n', "invalid_params"),
                (b'{"id": 1, "method": "find_peer", "params": {"peer_id": ""}}\n', "invalid_params"),
            ]
            for raw, code in cases:
                await conn.send(raw)
                reply = await conn.reply()
                assert reply["error"]["code"] == code, (raw[:60], reply)
                assert reply["error"]["message"]
            # a line far over the limit, sent in pieces, gets exactly one error
            await conn.send(b'{"id": 1, "method": "status", "pad": "' + b"y" * 100_000)
            await conn.send(b"y" * 100_000 + b'"}\n')
            assert (await conn.reply())["error"]["code"] == "request_too_large"
            # the same connection still works after every error (and no second error is queued)
            ok = await conn.call("status")
            assert ok["id"] == 7 and ok["result"]["peer_id"] == str(alice.host.get_id())
            # a request split across writes, and two requests in one write
            await conn.send(b'{"id": "a", "method"')
            await conn.send(b': "id"}\n{"id": "b", "method": "peers"}\n')
            first, second = await conn.reply(), await conn.reply()
            # the node resolves itself, with or without a forced lookup
            for lookup in (False, True):
                me = await conn.call("find_peer", peer_id=str(alice.host.get_id()), lookup=lookup)
                assert me["result"]["addrs"], me
            assert first["id"] == "a" and "account" in first["result"]
            assert second == {"id": "b", "result": []}
            # a client that disconnects mid-request does not hurt the daemon
            half = await trio.open_unix_socket(str(sock))
            await half.send_all(b'{"id": 1, "meth')
            await half.aclose()
            fresh = Conn(await trio.open_unix_socket(str(sock)))
            assert (await fresh.call("id"))["result"]
            await fresh.stream.aclose()
            await conn.stream.aclose()


async def test_stop_answers_then_stops(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice"]) as nodes:
        alice = nodes["alice"]
        with trio.fail_after(10):
            conn = Conn(await trio.open_unix_socket(str(alice.home.control_socket)))
            reply = await conn.call("stop")
            assert reply["result"] == {"stopping": True}
            await alice.stopping.wait()
            await conn.stream.aclose()
            assert alice.stop_reason == "stop requested over the control socket"

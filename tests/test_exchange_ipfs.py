"""``[ipfs] api``: published chunks are also put to IPFS as raw blocks, and a fetch takes from
IPFS the chunks no peer provides, each verified by its SHA-256 before it is stored.

IPFS here is a stand-in HTTP server implementing the two endpoints used (``/api/v0/block/put``
and ``/api/v0/block/get``) the way Kubo answers them: a test double of a program outside our
control. No real IPFS daemon could be installed; this checks our side of the HTTP API only."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import trio

from prsm_node.config import Config, from_dict
from prsm_node.exceptions import ConfigError
from prsm_node.exchange import IpfsBlocks, ipfs_from_config

from .conftest import running_nodes
from .test_exchange import TEST_FETCH, assert_identical, connect, publish, svc


def cid_of(data: bytes) -> str:
    """CIDv1, raw codec (0x55), sha2-256 multihash, base32 multibase: as Kubo names a raw block."""
    return cid_of_hash(hashlib.sha256(data).digest())


class FakeIpfs:
    """An in-memory IPFS block API on 127.0.0.1; ``corrupt`` CIDs are served with a byte flipped."""

    def __init__(self) -> None:
        self.blocks: dict[str, bytes] = {}
        self.corrupt: set[str] = set()
        self.gets: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _reply(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                url = urlparse(self.path)
                query = parse_qs(url.query)
                body = self._body()
                if url.path == "/api/v0/block/put":
                    if query.get("cid-codec") != ["raw"] or query.get("mhtype") != ["sha2-256"]:
                        return self._reply(400, b'{"Message": "unexpected options", "Code": 0}', "application/json")
                    boundary = self.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
                    part = body.split(b"--" + boundary)[1]
                    data = part.split(b"\r\n\r\n", 1)[1][: -len(b"\r\n")]
                    cid = cid_of(data)
                    fake.blocks[cid] = data
                    return self._reply(200, json.dumps({"Key": cid, "Size": len(data)}).encode(), "application/json")
                if url.path == "/api/v0/block/get":
                    cid = query["arg"][0]
                    fake.gets.append(cid)
                    if cid not in fake.blocks:
                        return self._reply(500, b'{"Message": "block was not found locally", "Code": 0, '
                                                b'"Type": "error"}', "application/json")
                    data = fake.blocks[cid]
                    if cid in fake.corrupt:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    return self._reply(200, data, "text/plain")
                return self._reply(404, b"404 page not found", "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api = f"/ip4/127.0.0.1/tcp/{self.server.server_address[1]}/http"


@contextmanager
def fake_ipfs() -> Iterator[FakeIpfs]:
    fake = FakeIpfs()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(5)


def test_the_ipfs_section_is_off_by_default_and_validated() -> None:
    assert Config().ipfs.api == "" and ipfs_from_config(Config().ipfs) is None
    cfg = from_dict({"ipfs": {"api": "/ip4/127.0.0.1/tcp/5001/http", "timeout": 5}})
    assert (cfg.ipfs.api, cfg.ipfs.timeout) == ("/ip4/127.0.0.1/tcp/5001/http", 5.0)
    with pytest.raises(ConfigError, match=r"\[ipfs\]\.api"):
        from_dict({"ipfs": {"api": "http://localhost:5001"}})


async def test_published_chunks_go_to_ipfs_and_a_fetch_takes_from_it_what_no_peer_has(short_tmp: Path) -> None:
    with fake_ipfs() as fake:
        async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
            alice, bob = nodes["alice"], nodes["bob"]
            cfg = from_dict({"ipfs": {"api": fake.api, "timeout": 5}})
            svc(alice).ipfs = ipfs_from_config(cfg.ipfs)
            svc(bob).ipfs = IpfsBlocks(fake.api, timeout=5)
            mid, tensors = await publish(alice, short_tmp / "src")
            m = svc(alice).store.get_manifest(mid)
            assert set(fake.blocks) == {cid_of(svc(alice).store.read_chunk(mid, i)) for i in range(m.chunk_count)}

            # alice lost a third of her chunks: those come from IPFS, the rest from alice.
            lost = list(range(0, m.chunk_count, 3))
            svc(alice).store.discard(mid, lost)
            await connect(bob, alice)
            svc(bob).fetch_params = TEST_FETCH
            with trio.fail_after(30):
                f = await svc(bob).fetch(mid)
            assert f.state == "done", f.error
            assert f.chunks_from_ipfs == len(lost) and f.chunks_fetched == m.chunk_count
            assert sorted(fake.gets) == sorted(cid_of_hash(m.chunk_hashes()[i]) for i in lost)
            assert_identical(f, short_tmp / "src", tensors)


async def test_a_block_from_ipfs_that_fails_verification_is_not_stored(short_tmp: Path) -> None:
    with fake_ipfs() as fake:
        async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
            alice, bob = nodes["alice"], nodes["bob"]
            svc(alice).ipfs = IpfsBlocks(fake.api, timeout=5)
            svc(bob).ipfs = IpfsBlocks(fake.api, timeout=5)
            mid, _ = await publish(alice, short_tmp / "src")
            m = svc(alice).store.get_manifest(mid)
            victim = m.chunk_hashes()[1]
            svc(alice).store.discard(mid, [1])
            fake.corrupt.add(cid_of_hash(victim))
            await connect(bob, alice)
            svc(bob).fetch_params = TEST_FETCH
            with trio.fail_after(30):
                f = await svc(bob).fetch(mid)
            assert f.state == "failed" and "1 chunks" in (f.error or ""), f.error
            assert f.chunks_from_ipfs == 0 and not svc(bob).store.present(mid)[1]
            assert svc(bob).store.present(m).count(False) == 1


def cid_of_hash(chunk_hash: bytes) -> str:
    return "b" + base64.b32encode(bytes([1, 0x55, 0x12, 32]) + chunk_hash).decode().lower().rstrip("=")

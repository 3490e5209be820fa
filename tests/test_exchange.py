"""The model exchange between real hosts on 127.0.0.1: publish on one node, fetch on others
(from one provider, then from two at once), every chunk verified; a provider serving corrupt
chunks is penalised and dropped; a provider stopped mid-transfer is replaced; an interrupted
fetch resumes without fetching a verified chunk twice; bad requests and a forged manifest are
refused with the right error, and the node goes on serving."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nacl.signing
import pytest
import torch
import trio
from libp2p.abc import INetStream
from safetensors.torch import load_file, save_file

from prsm_node.exchange import Fetch, FetchBusy, FetchParams
from prsm_node.exchange.client import RECEIVE_WINDOW, SHARD, widen_receive_window
from prsm_node.exchange.registry import (
    InvalidRecord,
    decode_record,
    encode_record,
    record_key,
    select_record,
    sign_record,
    validate_record,
)
from prsm_node.node import Node
from prsm_node.shards import (
    MAX_REQUEST_SIZE,
    Assembly,
    End,
    Error,
    ErrorCode,
    GetChunks,
    GetManifest,
    Have,
    HaveReply,
    Manifest,
    ManifestReply,
    ShardStore,
    decode_message,
    decode_request,
    encode_manifest,
    encode_message,
)
from prsm_node.wire import encode_uvarint, guarded_handler, read_frame, write_frame

from .conftest import running_nodes

CHUNK = 64 * 1024
TEST_FETCH = FetchParams(open_timeout=3.0, response_timeout=5.0, ramp_bytes=0)  # all providers from the start


def make_model(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Two safetensors files, ~1.9 MiB: 30 chunks of 64 KiB."""
    gen = torch.Generator().manual_seed(7)
    files = {
        "model.safetensors": {
            "embed.weight": torch.randn(512, 512, generator=gen),
            "layers.0.weight": torch.randn(256, 768, generator=gen),
            "layers.0.bias": torch.randn(768, generator=gen),
        },
        "extra/head.safetensors": {"head.weight": torch.randn(64, 200, generator=gen).to(torch.float16)},
    }
    folder.mkdir(exist_ok=True)
    for rel, tensors in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / rel))
    return files


class FlippingStore(ShardStore):
    """A misbehaving provider: every chunk it serves has one byte flipped."""

    def read_chunk(self, manifest_id: bytes, index: int, *, verify: bool = True) -> bytes:
        data = bytearray(super().read_chunk(manifest_id, index, verify=verify))
        data[len(data) // 2] ^= 0xFF
        return bytes(data)


class SlowStore(ShardStore):
    """A provider with a slow disk (reads run in a worker thread, so sleeping blocks only it)."""

    delay = 0.01

    def read_chunk(self, manifest_id: bytes, index: int, *, verify: bool = True) -> bytes:
        time.sleep(self.delay)
        return super().read_chunk(manifest_id, index, verify=verify)


class ReportingStore(ShardStore):
    """A provider that reports (from its reading thread) each chunk index it is asked to read."""

    def __init__(self, *args: object, reached: Callable[[int], None]) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.reached = reached

    def read_chunk(self, manifest_id: bytes, index: int, *, verify: bool = True) -> bytes:
        self.reached(index)
        return super().read_chunk(manifest_id, index, verify=verify)


class StalledWriteStore(ShardStore):
    """A fetcher whose disk stalls: the write of chunk 0 blocks until ``release`` is set."""

    release = threading.Event()

    def open_assembly(self, m: Manifest) -> Assembly:
        assembly = super().open_assembly(m)
        write, release = assembly.write, self.release

        def stalled(index: int, data: bytes | memoryview) -> None:
            if index == 0:
                release.wait(30)
            write(index, data)

        assembly.write = stalled  # type: ignore[method-assign]
        return assembly


def svc(node: Node):  # type: ignore[no-untyped-def]
    assert node.shards is not None
    node.shards.fetch_params = TEST_FETCH
    return node.shards


async def connect(a: Node, b: Node) -> None:
    with trio.fail_after(10):
        assert a.kad is not None
        await a.kad.find_peer(b.host.get_id())


async def publish(node: Node, folder: Path) -> tuple[bytes, dict[str, dict[str, torch.Tensor]]]:
    tensors = make_model(folder)
    with trio.fail_after(20):
        result = await svc(node).publish(folder, name="prsm/test-model", version="1.0.0", tags=["lm"],
                                         chunk_size=CHUNK)
    assert result["chunks"] == result["chunks_written"] >= 30
    return bytes.fromhex(result["id"]), tensors


async def fetch(node: Node, mid: bytes, *, params: FetchParams = TEST_FETCH) -> Fetch:
    service = svc(node)  # svc() sets TEST_FETCH: ``params`` after it
    service.fetch_params = params
    with trio.fail_after(30):
        f = await service.fetch(mid)
    assert f.state == "done", f.error
    return f


def assert_identical(f: Fetch, source: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    dest = f.dest
    for rel, expected in tensors.items():
        assert (dest / rel).read_bytes() == (source / rel).read_bytes()
        loaded = load_file(str(dest / rel))
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor)


def served(node: Node) -> int:
    return svc(node).chunks_served


def provider_stats(f: Fetch, node: Node) -> dict[str, object]:
    return next(p for p in f.progress()["providers"] if p["peer_id"] == str(node.host.get_id()))


async def test_publish_then_fetch_from_one_then_from_two_in_parallel(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, tensors = await publish(alice, short_tmp / "src")
        src = short_tmp / "src"

        first = await fetch(bob, mid)
        total = first.chunks_total
        assert (first.chunks_fetched, first.chunks_present) == (total, 0)
        assert served(alice) == total
        assert_identical(first, src, tensors)

        await connect(carol, bob)
        before = served(alice), served(bob)
        second = await fetch(carol, mid)
        assert (second.chunks_fetched, second.chunks_present) == (total, 0)
        from_alice, from_bob = served(alice) - before[0], served(bob) - before[1]
        assert from_alice > 0 and from_bob > 0 and from_alice + from_bob == total
        assert_identical(second, src, tensors)

        again = await fetch(carol, mid)  # everything is stored: nothing goes over the network
        assert (again.chunks_fetched, again.chunks_present) == (0, total)
        assert served(alice) + served(bob) == sum(before) + total


async def test_a_ramped_fetch_starts_with_one_provider_and_completes(short_tmp: Path) -> None:
    """With the ramp on (the default; here a step every 4 chunks) a fetch starts with one
    provider and measures each step; whichever count it settles on, the files come out whole."""
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, tensors = await publish(alice, short_tmp / "src")
        await fetch(bob, mid)
        await connect(carol, bob)
        f = await fetch(carol, mid, params=replace(TEST_FETCH, ramp_bytes=4 * CHUNK, max_batch=2))
        ramp = f.progress()["ramp"]
        assert ramp["steps"] and ramp["steps"][0][0] == 1
        assert f.chunks_fetched == f.chunks_total
        assert_identical(f, short_tmp / "src", tensors)


async def test_corrupt_provider_is_penalised_and_its_chunks_come_from_others(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, tensors = await publish(alice, short_tmp / "src")
        await fetch(bob, mid)
        svc(bob).store = FlippingStore(bob.home.data_dir)
        await connect(carol, bob)

        f = await fetch(carol, mid)
        bad = provider_stats(f, bob)
        assert bad["bad_chunks"] and bad["dropped"] and "verification" in str(bad["dropped"])
        assert f.bad_chunks == bad["bad_chunks"] and f.chunks_fetched == f.chunks_total
        assert provider_stats(f, alice)["chunks"] == f.chunks_total
        assert_identical(f, short_tmp / "src", tensors)


async def test_a_model_file_damaged_on_disk_is_not_served_and_the_node_serves_on(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, tensors = await publish(alice, short_tmp / "src")
        await fetch(bob, mid)
        m = svc(bob).store.get_manifest(mid)
        which = [f.path for f in m.files].index("model.safetensors")
        path = svc(bob).store.files(mid)[which]
        data = bytearray(path.read_bytes())
        data[3 * CHUNK + 5] ^= 0xFF  # bob's copy, edited behind the node's back
        path.write_bytes(bytes(data))
        bad = m.first_chunk(which) + 3

        # asked directly: ERROR internal naming the chunk; HAVE no longer shows it
        reply = await ask(carol, bob, frame(GetChunks(mid, (bad,))))
        assert error_code(reply) == ErrorCode.INTERNAL and f"chunk {bad}" in reply.message  # type: ignore[attr-defined]
        have = await ask(carol, bob, frame(Have(mid)))
        assert isinstance(have, HaveReply) and have.indices() == [i for i in range(m.chunk_count) if i != bad]
        assert not svc(bob).store.is_complete(mid)

        await connect(carol, bob)
        f = await fetch(carol, mid)
        assert f.chunks_fetched == f.chunks_total
        assert_identical(f, short_tmp / "src", tensors)

        repaired = await fetch(bob, mid)  # fetching again rewrites just that chunk, in place
        assert (repaired.chunks_fetched, repaired.chunks_present) == (1, repaired.chunks_total - 1)
        assert path.read_bytes() == (short_tmp / "src" / "model.safetensors").read_bytes()


async def test_provider_stopped_mid_transfer_is_replaced_by_the_others(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, tensors = await publish(alice, short_tmp / "src")
        await fetch(bob, mid)
        svc(bob).store = SlowStore(bob.home.data_dir)
        svc(alice).store = SlowStore(alice.home.data_dir)
        await connect(carol, bob)

        svc(carol).fetch_params = replace(TEST_FETCH, slow_factor=0.0)
        f = svc(carol).start_fetch(mid)
        with trio.fail_after(20):
            await f.wait_until(lambda f: any(p.chunks > 0 for p in f.providers.values() if p.peer == bob.host.get_id()))
        assert f.running
        bob.stop("test: provider goes away mid-transfer")
        with trio.fail_after(30):
            await f.done.wait()
        assert f.state == "done", f.error
        assert provider_stats(f, bob)["dropped"]
        assert f.chunks_fetched == f.chunks_total
        assert_identical(f, short_tmp / "src", tensors)


async def test_a_stalled_disk_write_does_not_hold_up_the_next_requests(short_tmp: Path) -> None:
    """The worker asks for more while a batch's chunks are still being verified and written:
    with the write of chunk 0 (batch 1) stalled, the provider is asked for batch 3 (chunks
    8-11; batch 2 was asked ahead of batch 1's answer). Then the fetch completes."""
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        mid, tensors = await publish(alice, short_tmp / "src")
        third_batch = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def reached(index: int) -> None:
            if index >= 8:
                token.run_sync_soon(third_batch.set)

        svc(alice).store = ReportingStore(alice.home.data_dir, reached=reached)
        stalled = StalledWriteStore(bob.home.data_dir)
        stalled.release = threading.Event()
        service = svc(bob)  # svc() sets TEST_FETCH: the params after it
        service.store = stalled
        service.fetch_params = replace(TEST_FETCH, max_request_bytes=4 * CHUNK, store_flush_bytes=CHUNK)
        f = service.start_fetch(mid)
        try:
            with trio.fail_after(10):
                await third_batch.wait()
            assert 0 in f.sched.in_flight  # chunk 0 has not landed: the requests did not wait for it
        finally:
            stalled.release.set()
        with trio.fail_after(30):
            await f.done.wait()
        assert f.state == "done", f.error
        assert f.chunks_fetched == f.chunks_total
        assert_identical(f, short_tmp / "src", tensors)


async def test_interrupted_fetch_resumes_without_fetching_a_chunk_twice(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        mid, tensors = await publish(alice, short_tmp / "src")
        svc(alice).store = SlowStore(alice.home.data_dir)

        svc(bob).fetch_params = TEST_FETCH
        f = svc(bob).start_fetch(mid)
        with trio.fail_after(20):
            await f.wait_until(lambda f: f.chunks_fetched >= 8)
        with pytest.raises(FetchBusy):  # `model rm` refuses while the fetch writes
            await svc(bob).remove(mid)
        f.cancel()
        with trio.fail_after(10):
            await f.done.wait()
        assert f.state == "cancelled"
        m = svc(bob).store.get_manifest(mid)
        stored = sum(svc(bob).store.present(m))
        assert 8 <= stored < m.chunk_count

        resumed = await fetch(bob, mid)
        assert resumed.chunks_present == stored
        # Every chunk received (verified, stored or not) counts for its provider: none came twice.
        assert resumed.chunks_fetched == m.chunk_count - stored == provider_stats(resumed, alice)["chunks"]
        assert_identical(resumed, short_tmp / "src", tensors)


async def test_a_resumed_fetch_refetches_an_earlier_chunk_damaged_meanwhile(short_tmp: Path) -> None:
    """Resuming, the fetch receives the missing chunks, then finds a chunk of the earlier run
    damaged on disk and fetches it in a second round, from the same provider."""
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        mid, tensors = await publish(alice, short_tmp / "src")
        svc(alice).store = SlowStore(alice.home.data_dir)

        f = svc(bob).start_fetch(mid)
        with trio.fail_after(20):
            await f.wait_until(lambda f: f.chunks_fetched >= 8)
        f.cancel()
        with trio.fail_after(10):
            await f.done.wait()
        store = svc(bob).store
        m = store.get_manifest(mid)
        present = store.present(m)
        bad = present.index(True)
        assert not all(present)
        span = store.spans(mid)[bad]
        path = store.partial_dir(mid) / m.files[span.file_index].path
        data = bytearray(path.read_bytes())
        data[span.offset + 5] ^= 0xFF  # a chunk of the earlier run, damaged behind the node's back
        path.write_bytes(bytes(data))

        resumed = await fetch(bob, mid)
        assert resumed.chunks_present == sum(present) - 1
        assert resumed.chunks_fetched == m.chunk_count - sum(present) + 1
        assert_identical(resumed, short_tmp / "src", tensors)


async def test_a_chunk_stream_gets_the_large_receive_window(short_tmp: Path) -> None:
    """On a real yamux stream: widen_receive_window reaches py-libp2p's window target (a
    py-libp2p that renamed it would silently leave fetches at 256-512 KiB of credit), and the
    buffer, event and credit FrameReader waits on are where it looks for them."""
    async with running_nodes(short_tmp, ["alice", "bob"]) as nodes:
        with trio.fail_after(10):
            stream = await nodes["bob"].host.new_stream(nodes["alice"].host.get_id(), [SHARD])
        try:
            muxed = stream.muxed_stream  # type: ignore[attr-defined]
            assert muxed.target_recv_window < RECEIVE_WINDOW
            widen_receive_window(stream)
            assert muxed.target_recv_window == RECEIVE_WINDOW
            # What FrameReader._buffered looks at (without it, reads go frame by frame again).
            conn = muxed.conn
            assert isinstance(conn.stream_buffers[muxed.stream_id], bytearray)
            assert isinstance(conn.stream_events[muxed.stream_id], trio.Event)
            assert isinstance(muxed.recv_window, int) and muxed.recv_window > 0
            assert muxed.recv_closed is False and muxed.reset_received is False
        finally:
            await stream.close()


async def ask(client: Node, server: Node, body: bytes, limit: int = 1 << 20) -> object:
    with trio.fail_after(10):
        stream = await client.host.new_stream(server.host.get_id(), [SHARD])
        try:
            await stream.write(body)
            return decode_message(await read_frame(stream, limit), max_size=limit)
        finally:
            await stream.close()


def frame(msg: object) -> bytes:
    body = encode_message(msg) if not isinstance(msg, bytes) else msg  # type: ignore[arg-type]
    return encode_uvarint(len(body)) + body


def error_code(reply: object) -> ErrorCode:
    assert isinstance(reply, Error), reply
    assert reply.message
    return reply.code


async def test_bad_requests_and_a_forged_manifest_are_refused_and_the_node_serves_on(short_tmp: Path) -> None:
    async with running_nodes(short_tmp, ["alice", "bob", "carol"]) as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        mid, _ = await publish(alice, short_tmp / "src")
        count = svc(alice).store.get_manifest(mid).chunk_count
        unknown = hashlib.sha256(b"nothing").digest()
        cases: list[tuple[bytes, ErrorCode]] = [
            (frame(GetChunks(mid, (0, count))), ErrorCode.BAD_REQUEST),  # index not in the manifest
            (frame(GetChunks(unknown, (0,))), ErrorCode.NOT_FOUND),
            (frame(GetManifest(unknown)), ErrorCode.NOT_FOUND),
            (frame(Have(unknown)), ErrorCode.NOT_FOUND),
            (frame(b"\xc1junk"), ErrorCode.BAD_REQUEST),
            (frame(encode_message(End())), ErrorCode.BAD_REQUEST),  # not a request
            (frame(b"\x93\x05\xc4\x20" + mid + b"\x92\x03\x01"), ErrorCode.BAD_REQUEST),  # unsorted
            (frame(b"\x93\x05\xc4\x20" + mid + b"\xdc" + (65).to_bytes(2, "big") + bytes(range(65))),
             ErrorCode.BAD_REQUEST),  # 65 indices
            (encode_uvarint(MAX_REQUEST_SIZE + 1) + b"\x00" * 64, ErrorCode.TOO_LARGE),
        ]
        for body, code in cases:
            assert error_code(await ask(bob, alice, body)) == code, body[:12]

        # A fifth concurrent stream from one peer is answered busy.
        with trio.fail_after(10):
            streams: list[INetStream] = []
            for _ in range(4):
                s = await bob.host.new_stream(alice.host.get_id(), [SHARD])
                await write_frame(s, encode_message(Have(mid)))
                assert isinstance(decode_message(await read_frame(s, 1 << 20)), HaveReply)
                streams.append(s)
            assert error_code(await ask(bob, alice, frame(Have(mid)))) == ErrorCode.BUSY
            for s in streams:
                await s.close()

        # The node serves on: manifest, HAVE (every chunk), chunks.
        reply = await ask(bob, alice, frame(GetManifest(mid)), 5 << 20)
        assert isinstance(reply, ManifestReply) and hashlib.sha256(reply.manifest).digest() == mid
        have = await ask(bob, alice, frame(Have(mid)))
        assert isinstance(have, HaveReply) and have.indices() == list(range(count))

        # A peer serving a manifest whose signature is forged: the fetch refuses it, stores nothing.
        real = svc(alice).store.get_manifest(mid)
        forged = encode_manifest(replace(real, description="forged", signature=bytes(64)))
        forged_id = hashlib.sha256(forged).digest()

        async def evil(stream: INetStream) -> None:
            request = decode_request(await read_frame(stream, MAX_REQUEST_SIZE))
            assert isinstance(request, GetManifest)
            await write_frame(stream, encode_message(ManifestReply(forged)))

        carol.host.set_stream_handler(SHARD, guarded_handler("evil", evil))
        await connect(bob, carol)
        svc(bob).fetch_params = TEST_FETCH
        with trio.fail_after(20):
            f = await svc(bob).fetch(forged_id)
        assert f.state == "failed" and "BadManifestSignature" in (f.error or ""), f.error
        assert not svc(bob).store.has_manifest(forged_id)
        assert svc(alice).errors_sent["busy"] == 1




def test_name_records_are_signed_bound_to_their_keys_and_the_newest_version_wins() -> None:
    key = nacl.signing.SigningKey(b"\x05" * 32)
    mid = hashlib.sha256(b"model").digest()
    records = [sign_record(key, "prsm/m", v, mid, created=c) for v, c in [("1.2", 10), ("1.10", 5), ("2.0-rc1", 20)]]
    encoded = [encode_record(r) for r in records]
    for r, data in zip(records, encoded, strict=True):
        assert decode_record(data) == r
        validate_record(record_key("prsm/m"), data)
        validate_record(record_key("prsm/m", r.version), data)
    assert select_record(record_key("prsm/m"), [encoded[0], b"junk", encoded[2], encoded[1]]) == 3
    with pytest.raises(InvalidRecord):
        validate_record(record_key("prsm/other"), encoded[0])
    with pytest.raises(InvalidRecord):
        validate_record(record_key("prsm/m", "1.10"), encoded[0])
    forged = encode_record(replace(records[0], manifest_id=bytes(32)))
    with pytest.raises(InvalidRecord, match="signature"):
        decode_record(forged)

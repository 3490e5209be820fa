"""The requester's frame reader: frames come out whole whatever the read boundaries (a length
split across reads, several frames in one read, a frame in many reads), a length over the
limit is refused before its body is read, and a stream that ends inside a frame is an error.
And the responder's side: frames cut into equal write pieces whatever the parts' sizes."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from prsm_node.exchange.client import FrameReader
from prsm_node.exchange.service import WRITE_PIECE, pieces
from prsm_node.wire import FrameError, encode_uvarint

from .pieces import Pieces, frames


class Yamuxed:
    """Stands in for a py-libp2p 0.8.1 yamux stream as FrameReader sees it: ``feed`` is a yamux
    DATA frame arriving (appended to the connection's buffer for the stream, its event set,
    the sender's credit spent); ``read`` takes what is buffered, up to ``n``, releasing its
    credit. ``feeder`` waits for credit as a yamux sender does."""

    def __init__(self, credit: int) -> None:
        conn = type("Conn", (), {"stream_buffers": {7: bytearray()}, "stream_events": {7: trio.Event()}})()
        self.muxed_stream = type("Muxed", (), {"conn": conn, "stream_id": 7, "recv_window": credit,
                                               "recv_closed": False, "reset_received": False})()
        self.buffer: bytearray = conn.stream_buffers[7]
        self.events: dict[int, trio.Event] = conn.stream_events
        self.reads = 0
        self.credit_back = trio.Event()

    async def _wait(self) -> None:
        event = self.events[7]
        await event.wait()
        if self.events[7] is event:
            self.events[7] = trio.Event()

    async def read(self, n: int) -> bytes:
        self.reads += 1
        while not self.buffer:
            await self._wait()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.muxed_stream.recv_window += len(data)
        self.credit_back.set()
        self.credit_back = trio.Event()
        return data

    async def feeder(self, data: bytes, frame: int = 65_507) -> None:
        for i in range(0, len(data), frame):
            while self.muxed_stream.recv_window <= 0:
                await self.credit_back.wait()
            piece = data[i:i + frame]
            self.buffer.extend(piece)
            self.muxed_stream.recv_window -= len(piece)
            self.events[7].set()
            await trio.testing.wait_all_tasks_blocked()  # the reader is caught up before the next arrives


async def read_all(stream: Pieces, count: int, limit: int = 1 << 22) -> list[bytes]:
    reader = FrameReader(stream)  # type: ignore[arg-type]
    return [bytes(await reader.read(limit)) for _ in range(count)]


async def test_frames_come_out_whole_whatever_the_read_boundaries() -> None:
    rng = random.Random(3)
    bodies = [rng.randbytes(n) for n in (0, 1, 127, 128, 300, 70_000, 1 << 20, 5)]
    data = frames(bodies)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 40)))
        assert await read_all(Pieces(data, cuts), len(bodies)) == bodies
    one_read = Pieces(data, [])
    assert await read_all(one_read, len(bodies)) == bodies
    assert one_read.reads == 2  # everything in one read (1 MiB at a time, the rest in another)
    byte_by_byte = Pieces(frames(bodies[:5]), list(range(1, len(frames(bodies[:5])))))
    assert await read_all(byte_by_byte, 5) == bodies[:5]


async def test_an_oversized_length_is_refused_before_its_body_and_a_cut_frame_is_an_error() -> None:
    stream = Pieces(encode_uvarint(5000) + b"x" * 5000, [2])
    with pytest.raises(FrameError, match="exceeds the limit"):
        await read_all(stream, 1, limit=4096)
    assert stream.pieces  # the body was never read
    with pytest.raises(FrameError, match="ended"):
        await read_all(Pieces(frames([b"abc"])[:-1], []), 1)
    with pytest.raises(FrameError, match="longer than 10 bytes"):
        await read_all(Pieces(b"\xff" * 11, [3]), 1)


def test_write_pieces_are_the_parts_cut_evenly_and_views_where_they_can_be() -> None:
    rng = random.Random(5)
    for _ in range(500):
        parts = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 8))]
        size = rng.randrange(1, 20)
        out = [bytes(p) for p in pieces(parts, size)]
        assert b"".join(out) == b"".join(parts)
        assert all(len(p) == size for p in out[:-1]) and all(0 < len(p) <= size for p in out)
    chunk = rng.randbytes(1 << 20)
    head = b"\x01" * 9
    cut = list(pieces([head, chunk, head, chunk], WRITE_PIECE))
    assert b"".join(bytes(p) for p in cut) == head + chunk + head + chunk
    assert sum(isinstance(p, bytes) for p in cut) <= 2  # joined only across a frame boundary


async def read_one_body(credit: int, seed: int) -> int:
    """A 1 MiB CHUNK frame sent in yamux frames to a caught-up FrameReader with ``credit``
    bytes of receive window: the body must come out whole; returns the reads it took."""
    body = random.Random(seed).randbytes(1 << 20)
    stream = Yamuxed(credit=credit)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(bytes(await FrameReader(stream).read(1 << 21)))  # type: ignore[arg-type]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.feeder(frames([body]))
    assert got == [body]
    return stream.reads


async def test_a_frame_arriving_in_yamux_frames_is_read_whole_not_one_read_per_yamux_frame() -> None:
    """A caught-up reader waits (without reading) until the rest of a body is buffered: a
    1 MiB CHUNK frame arriving in 17 yamux frames takes 2 reads (length, then the rest), not
    one per yamux frame (each read costs the requester, the bottleneck, real work)."""
    assert await read_one_body(16 << 20, seed=9) == 2


async def test_a_reader_waiting_for_a_body_reads_when_the_sender_runs_out_of_credit() -> None:
    """No deadlock: with less credit than the body, the reader reads when the credit is spent
    (the read gives it back), and the frame still comes out whole."""
    assert 2 < await read_one_body(200_000, seed=10) < 17

"""``wire.read_frame``: frames come out whole whatever the read boundaries (a length split
across reads, several frames in one read, a frame in many reads), a frame that arrived whole
costs one read, a length over the limit is refused before its body is read, and a stream that
ends inside a frame is an error."""

from __future__ import annotations

import random

import pytest

from prsm_node.wire import READ_SIZE, FrameError, encode_uvarint, read_frame

from .pieces import Pieces, frames


async def read_all(stream: Pieces, count: int, limit: int = 1 << 22) -> list[bytes]:
    return [await read_frame(stream, limit) for _ in range(count)]  # type: ignore[arg-type]


async def test_frames_come_out_whole_whatever_the_read_boundaries() -> None:
    rng = random.Random(5)
    bodies = [rng.randbytes(n) for n in (0, 1, 127, 128, 300, 70_000, 1 << 20, 5)]
    data = frames(bodies)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 40)))
        assert await read_all(Pieces(data, cuts), len(bodies)) == bodies
    byte_by_byte = Pieces(frames(bodies[:5]), list(range(1, len(frames(bodies[:5])))))
    assert await read_all(byte_by_byte, 5) == bodies[:5]


async def test_a_frame_that_arrived_whole_costs_one_read() -> None:
    small = [b"a" * 10, b"b" * 2000, b"c" * (READ_SIZE // 2)]
    for body in small:
        stream = Pieces(frames([body]), [])
        assert await read_all(stream, 1) == [body]
        assert stream.reads == 1
    two = Pieces(frames(small[:2]), [])  # the second frame came with the first: no read for it
    assert await read_all(two, 2) == small[:2]
    assert two.reads == 1


async def test_an_oversized_length_is_refused_before_its_body_and_a_cut_frame_is_an_error() -> None:
    stream = Pieces(encode_uvarint(5000) + b"x" * 5000, [2])
    with pytest.raises(FrameError, match="exceeds the limit"):
        await read_all(stream, 1, limit=4096)
    assert stream.pieces  # the body was never read
    with pytest.raises(FrameError, match="ended"):
        await read_all(Pieces(frames([b"abc"])[:-1], []), 1)
    with pytest.raises(FrameError, match="longer than 10 bytes"):
        await read_all(Pieces(b"\xff" * 11, [3]), 1)

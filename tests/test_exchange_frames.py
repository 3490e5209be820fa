"""The requester's frame reader: frames come out whole whatever the read boundaries (a length
split across reads, several frames in one read, a frame in many reads), a length over the
limit is refused before its body is read, and a stream that ends inside a frame is an error.
And the responder's side: frames cut into equal write pieces whatever the parts' sizes."""

from __future__ import annotations

import random

import pytest

from prsm_node.exchange.client import FrameReader
from prsm_node.exchange.service import WRITE_PIECE, pieces
from prsm_node.wire import FrameError, encode_uvarint

from .pieces import Pieces, frames


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

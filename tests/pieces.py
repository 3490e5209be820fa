"""A stand-in for a libp2p stream that delivers bytes in chosen pieces, for frame-reader tests."""

from __future__ import annotations

import trio

from prsm_node.wire import encode_uvarint


class Pieces:
    """Stands in for a libp2p stream: each read returns the next piece (at most ``n`` bytes of it)."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
        self.reads = 0

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            piece, rest = piece[:n], piece[n:]
            self.pieces.insert(0, rest)
        return piece


def frames(bodies: list[bytes]) -> bytes:
    """``bodies`` as uvarint-length-prefixed frames."""
    return b"".join(encode_uvarint(len(b)) + b for b in bodies)

"""The requester side of ``/prsm/shard/1.0.0``: one stream to one provider, reused for many
requests, one request outstanding at a time (protocols/shard.md, Rules for requesters)."""

from __future__ import annotations

import hashlib
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..shards import (
    FRAME_OVERHEAD,
    MAX_MANIFEST_SIZE,
    PROTOCOL_ID,
    Chunk,
    End,
    Error,
    GetChunks,
    GetManifest,
    Have,
    HaveReply,
    ManifestReply,
    Message,
    Request,
    ShardDecodeError,
    decode_message,
    encode_message,
    max_chunk_frame,
)
from ..wire import TRAFFIC, FrameError, encode_uvarint, read_frame, write_frame
from .exceptions import ProtocolViolation, RemoteError, Unreachable

SHARD = TProtocol(PROTOCOL_ID)
# A responder serves at most this many requests on one stream; the requester opens a new one first.
MAX_REQUESTS_PER_STREAM = 4096
MANIFEST_FRAME = MAX_MANIFEST_SIZE + FRAME_OVERHEAD


async def open_stream(host: IHost, kad: Any, peer: ID, open_timeout: float) -> INetStream:
    try:
        with trio.fail_after(open_timeout):
            if peer not in host.get_network().connections:
                await kad.find_peer(peer)
            return await host.new_stream(peer, [SHARD])
    except Exception as exc:  # py-libp2p raises many types, some grouped; all mean "cannot reach"
        raise Unreachable(f"cannot open {PROTOCOL_ID} to {peer}: {exc!r}") from None


async def read_bulk_frame(stream: INetStream, max_size: int) -> bytes:
    """``wire.read_frame`` for large frames: the pieces the muxer hands over are joined once
    (one copy of a chunk instead of two)."""
    length = 0
    for i in range(10):
        piece = await stream.read(1)
        if not piece:
            raise FrameError("stream ended")
        length |= (piece[0] & 0x7F) << (7 * i)
        if not piece[0] & 0x80:
            break
    else:
        raise FrameError("frame length varint is longer than 10 bytes")
    if length > max_size:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_size}")
    pieces = []
    got = 0
    while got < length:
        piece = await stream.read(length - got)
        if not piece:
            raise FrameError(f"stream ended after {got} of {length} bytes")
        pieces.append(piece)
        got += len(piece)
    TRAFFIC.bytes_in += length + len(encode_uvarint(length))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class ShardStream:
    """Requests on one stream. Any exception but RemoteError leaves the stream unusable: close it."""

    def __init__(self, stream: INetStream, peer: ID, response_timeout: float) -> None:
        self.stream = stream
        self.peer = peer
        self.response_timeout = response_timeout
        self.requests = 0

    @classmethod
    async def open(cls, host: IHost, kad: Any, peer: ID, *, open_timeout: float,
                   response_timeout: float) -> ShardStream:
        return cls(await open_stream(host, kad, peer, open_timeout=open_timeout), peer, response_timeout)

    @property
    def worn_out(self) -> bool:
        return self.requests >= MAX_REQUESTS_PER_STREAM

    async def _send(self, request: Request) -> None:
        self.requests += 1
        await write_frame(self.stream, encode_message(request))

    async def _receive(self, limit: int) -> Message:
        with trio.fail_after(self.response_timeout):
            body = await read_frame(self.stream, limit)
        try:
            msg = decode_message(body, max_size=limit)
        except ShardDecodeError as exc:
            raise ProtocolViolation(f"{self.peer} sent an undecodable frame: {exc}") from None
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message)
        return msg

    async def get_manifest(self, manifest_id: bytes) -> bytes:
        """The manifest bytes, checked to hash to ``manifest_id`` (decode and verify are the caller's)."""
        await self._send(GetManifest(manifest_id))
        msg = await self._receive(MANIFEST_FRAME)
        if not isinstance(msg, ManifestReply):
            raise ProtocolViolation(f"{self.peer} answered GET_MANIFEST with {msg.TYPE.name}")
        if hashlib.sha256(msg.manifest).digest() != manifest_id:
            raise ProtocolViolation(f"{self.peer} sent a manifest that does not hash to {manifest_id.hex()}")
        return msg.manifest

    async def have(self, manifest_id: bytes, chunk_count: int) -> HaveReply:
        await self._send(Have(manifest_id))
        msg = await self._receive((chunk_count + 7) // 8 + FRAME_OVERHEAD)
        if not isinstance(msg, HaveReply) or msg.chunk_count != chunk_count:
            raise ProtocolViolation(f"{self.peer} sent a HAVE reply for another chunk count")
        return msg

    async def request_chunks(self, manifest_id: bytes, indices: list[int]) -> None:
        """Send GET_CHUNKS; then call ``next_chunk`` until it returns None (END)."""
        await self._send(GetChunks(manifest_id, tuple(indices)))

    async def next_chunk(self, chunk_size: int) -> Chunk | None:
        """The next CHUNK of the response, or None at END; the caller checks indices and hashes."""
        limit = max_chunk_frame(chunk_size)
        with trio.fail_after(self.response_timeout):
            body = await read_bulk_frame(self.stream, limit)
        try:
            msg = decode_message(body, max_size=limit)
        except ShardDecodeError as exc:
            raise ProtocolViolation(f"{self.peer} sent an undecodable frame: {exc}") from None
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message)
        if isinstance(msg, End):
            return None
        if not isinstance(msg, Chunk):
            raise ProtocolViolation(f"{self.peer} sent {msg.TYPE.name} among chunks")
        return msg

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.close()
            except Exception:  # the peer may be gone; nothing left to close
                pass

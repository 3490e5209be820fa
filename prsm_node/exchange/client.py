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
from ..wire import TRAFFIC, FrameError, write_frame
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


READ_SIZE = 1 << 20  # asked of the stream per read: whatever has arrived, up to this
# The receive window of a stream we fetch chunks on: py-libp2p's largest (go-yamux's too).
RECEIVE_WINDOW = 16 << 20


def widen_receive_window(stream: INetStream, size: int = RECEIVE_WINDOW) -> None:
    """Let a yamux stream's receive window grow to ``size`` at its first read.

    py-libp2p 0.8.1 starts a stream at 256 KiB and doubles its target only when window updates
    follow each other within 4 RTTs of the connection's ping RTT. On a long-lived connection
    to a near peer that RTT was measured idle (0.1 ms on loopback), so the window may stay at
    256-512 KiB for a whole fetch: a WINDOW_UPDATE for every 1-2 frames received, the
    provider stalling on credit. Measured on a 256 MiB fetch, 2 daemons on 127.0.0.1: target
    stuck at 512 KiB (~870 updates, 59-65 MB/s) in 2 of ~6 runs, else grown to 16 MiB
    (~170 updates, 85-95 MB/s). A fresh connection (the bench's bare stream) measures its RTT
    under load and always grows. A bulk requester knows it wants the large window from the
    start; the bytes a provider can send ahead are bounded by it (we read them promptly)."""
    muxed = getattr(stream, "muxed_stream", None)
    target = getattr(muxed, "target_recv_window", None)
    if isinstance(target, int) and target < size:
        muxed.target_recv_window = size  # type: ignore[union-attr]


class FrameReader:
    """Frames from one stream with as few reads and copies as py-libp2p allows. Each read takes
    whatever has arrived (up to ``READ_SIZE``); what it holds beyond the current frame is kept
    (a view, not a copy) for the next. Every yamux read costs Python work and a window update,
    so reading a frame's length byte by byte (three reads per CHUNK) would cost the requester,
    the bottleneck of a transfer, a sixth more reads; a body is joined from its pieces once."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self._rest = memoryview(b"")

    async def _read(self, size: int) -> bytes:
        piece = await self.stream.read(size)
        if not piece:
            raise FrameError("stream ended inside a frame")
        return piece

    async def _buffered(self, size: int) -> None:
        """Wait, without reading, until py-libp2p's yamux buffer of this stream holds ``size``
        bytes, the sender has no credit left for more (a read releases it), or the stream
        ended; so the rest of a frame body is taken in one read, not one per yamux frame.

        A caught-up reader is woken for every yamux frame (64 KiB) that arrives; each read
        costs the requester, the bottleneck of a transfer, a locked buffer slice, a window
        update check and py-libp2p's debug f-strings, where checking a length is nearly
        free. Relies on py-libp2p 0.8.1's ``Yamux.stream_buffers`` / ``stream_events``;
        where they are missing it returns at once (reads as before)."""
        muxed = getattr(self.stream, "muxed_stream", None)
        conn = getattr(muxed, "conn", None)
        buffers = getattr(conn, "stream_buffers", None)
        events = getattr(conn, "stream_events", None)
        sid = getattr(muxed, "stream_id", None)
        if not isinstance(buffers, dict) or not isinstance(events, dict) or sid is None:
            return
        while True:
            buffer = buffers.get(sid)
            if buffer is None or len(buffer) >= size or getattr(muxed, "recv_window", 0) <= 0 \
                    or getattr(muxed, "recv_closed", True) or getattr(muxed, "reset_received", True):
                return
            event = events.get(sid)
            if event is None:
                return
            await event.wait()
            if events.get(sid) is event:  # as py-libp2p's own reader does: a fresh event for the next frame
                events[sid] = trio.Event()

    async def read(self, max_size: int) -> memoryview:
        """One frame's body; a length over ``max_size`` is refused before the body is read."""
        while (parsed := _parse_length(self._rest)) is None:
            piece = await self._read(READ_SIZE)
            self._rest = memoryview(bytes(self._rest) + piece if self._rest else piece)
        length, pos = parsed
        if length > max_size:
            raise FrameError(f"frame of {length} bytes exceeds the limit of {max_size}")
        TRAFFIC.bytes_in += pos + length
        if len(self._rest) >= pos + length:
            body, self._rest = self._rest[pos:pos + length], self._rest[pos + length:]
            return body
        pieces: list[bytes | memoryview] = [self._rest[pos:]]
        have = len(pieces[0])
        while have < length:
            await self._buffered(length - have)
            piece = await self._read(max(length - have, READ_SIZE))
            pieces.append(piece)
            have += len(piece)
        joined = memoryview(b"".join(pieces))
        body, self._rest = joined[:length], joined[length:]
        return body


def _parse_length(data: memoryview) -> tuple[int, int] | None:
    """The frame length varint at the start of ``data`` and its size, or None if incomplete."""
    length = 0
    for pos in range(min(len(data), 10)):
        byte = data[pos]
        length |= (byte & 0x7F) << (7 * pos)
        if not byte & 0x80:
            return length, pos + 1
    if len(data) >= 10:
        raise FrameError("frame length varint is longer than 10 bytes")
    return None


class ShardStream:
    """Requests on one stream. Any exception but RemoteError leaves the stream unusable: close it."""

    def __init__(self, stream: INetStream, peer: ID, response_timeout: float) -> None:
        self.stream = stream
        self.peer = peer
        self.response_timeout = response_timeout
        self.requests = 0
        self._reader = FrameReader(stream)

    @classmethod
    async def open(cls, host: IHost, kad: Any, peer: ID, *, open_timeout: float,
                   response_timeout: float) -> ShardStream:
        stream = await open_stream(host, kad, peer, open_timeout=open_timeout)
        widen_receive_window(stream)
        return cls(stream, peer, response_timeout)

    @property
    def worn_out(self) -> bool:
        return self.requests >= MAX_REQUESTS_PER_STREAM

    async def _send(self, request: Request) -> None:
        self.requests += 1
        await write_frame(self.stream, encode_message(request))

    async def _receive(self, limit: int) -> Message:
        with trio.fail_after(self.response_timeout):
            body = await self._reader.read(limit)
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
            body = await self._reader.read(limit)
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

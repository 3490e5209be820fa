"""``ShardService``: serves ``/prsm/shard/1.0.0`` from the node's ShardStore, publishes models,
runs fetches, and answers what the ``model`` control methods ask (protocols/shard.md).

Serving: one handler per inbound stream, many requests per stream in order; at most
``max_streams_per_peer`` streams per peer and ``max_serving`` GET_CHUNKS at once (``busy``
beyond either); every request decoded with the 1024-byte limit and checked against the
manifest; chunks read from the model's files (the byte range the manifest gives each chunk)
and re-hashed when due (``ShardStore.read_chunk``) in a thread, a group at a time, their
CHUNK frames written in ``WRITE_PIECE`` pieces (views of the chunks' bytes, joined only where a
piece spans two frames), each one yamux frame in one Noise message (see PITFALLS, bulk
throughput). A chunk found corrupt on disk is reported, stops being served, and the response
ends with ``ERROR internal``.

Models live in the store's folders, ``models_dir/<manifest id hex>/`` once complete; the node
serves them from there. Every store call goes through ``trio.to_thread``, but the reads of
chunks to serve: they run in a thread of low priority (background.py), beside the transfer's
loop, the bottleneck.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from .._trio import TaskStatus
from ..keys import NodeKey
from ..logs import kv
from ..shards import (
    DEFAULT_CHUNK_SIZE,
    MAX_REQUEST_SIZE,
    PROTOCOL_ID,
    ChunkNotFound,
    End,
    Error,
    ErrorCode,
    GetChunks,
    GetManifest,
    Have,
    HaveReply,
    Manifest,
    ManifestNotFound,
    ManifestReply,
    Message,
    ModelBusy,
    ShardDecodeError,
    ShardError,
    ShardStore,
    build_manifest,
    chunk_header,
    decode_request,
    encode_bitmap,
    encode_manifest,
    encode_message,
    source_files,
)
from ..wire import TRAFFIC, FrameError, encode_uvarint, guarded_handler, read_frame, write_frame
from .background import LowPriorityThread
from .client import MAX_REQUESTS_PER_STREAM, SHARD
from .exceptions import FetchBusy, ModelHalted
from .fetch import Fetch
from .ipfs import IpfsBlocks
from .providers import Providers
from .registry import encode_record, sign_record
from .schedule import FetchParams

log = logging.getLogger(__name__)

MAX_STREAMS_PER_PEER = 4
MAX_SERVING = 64
INBOUND_IDLE_TIMEOUT = 30.0
WRITE_BYTES = 4 << 20  # chunk bytes read per thread call, then written in WRITE_PIECE pieces
# Bytes per stream.write: with yamux's 12-byte header a frame of 65,519 bytes, Noise's largest
# plaintext, so each piece goes out as one yamux frame in one Noise message. A larger write is
# cut by yamux into 65,536-byte frames that Noise must split again (two messages and a copy
# per frame); see PITFALLS, bulk throughput.
WRITE_PIECE = 65_535 - 16 - 12
REANNOUNCE_INTERVAL = 12 * 3600.0


def never_halted(manifest_id: bytes) -> bool:
    return False


class ShardService:
    """``is_halted(manifest_id)`` is the circuit breaker's decision (default: nothing is halted).
    A halted model is not served (``ERROR halted``), not fetched (``ModelHalted``), and a fetch
    running when its model becomes halted stops before its next batch."""

    def __init__(
        self,
        host: IHost,
        kad: Any,
        store: ShardStore,
        key: NodeKey,
        models_dir: Path,
        *,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
        max_serving: int = MAX_SERVING,
        idle_timeout: float = INBOUND_IDLE_TIMEOUT,
        fetch_params: FetchParams | None = None,
        reannounce_interval: float = REANNOUNCE_INTERVAL,
        publish_chunk_size: int = DEFAULT_CHUNK_SIZE,
        ipfs: IpfsBlocks | None = None,
    ) -> None:
        self.host = host
        self.kad = kad
        if Path(models_dir).resolve() != store.models_dir.resolve():
            raise ValueError(f"models_dir {models_dir} is not the store's ({store.models_dir})")
        self.store = store
        self.key = key
        self.models_dir = store.models_dir
        self.max_streams_per_peer = max_streams_per_peer
        self.max_serving = max_serving
        self.idle_timeout = idle_timeout
        self.fetch_params = fetch_params or FetchParams()
        self.reannounce_interval = reannounce_interval
        self.publish_chunk_size = publish_chunk_size
        self.is_halted: Callable[[bytes], bool] = never_halted
        self.ipfs = ipfs  # [ipfs] api: chunks also put there, and asked there when no peer has them
        self.providers = Providers(host, kad)
        self.fetches: dict[bytes, Fetch] = {}
        self._streams: Counter[ID] = Counter()
        self._serving = 0
        self._nursery: trio.Nursery | None = None
        self.chunks_served = 0
        self.bytes_served = 0
        self.requests_served = 0
        self.errors_sent: Counter[str] = Counter()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.providers.register_namespace()
        self.host.set_stream_handler(SHARD, guarded_handler(PROTOCOL_ID, self._handle))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._announce_loop)
            task_status.started()
            await trio.sleep_forever()

    async def _announce_loop(self) -> None:
        """Announce every stored manifest at start and then periodically (records expire)."""
        while True:
            for mid in await trio.to_thread.run_sync(self.store.manifest_ids):
                await self.providers.announce(mid)
            await trio.sleep(self.reannounce_interval)

    # ------------------------------------------------------------ serving

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        self._streams[peer] += 1
        try:
            for _ in range(MAX_REQUESTS_PER_STREAM):
                try:
                    with trio.fail_after(self.idle_timeout):
                        body = await read_frame(stream, MAX_REQUEST_SIZE)
                except StreamEOF:
                    return
                except FrameError as exc:
                    # An oversized length is refused before its body is read. We close rather than
                    # reset after an ERROR: py-libp2p drops unread data on reset, and the ERROR with it.
                    code = ErrorCode.TOO_LARGE if "exceeds the limit" in str(exc) else ErrorCode.BAD_REQUEST
                    await self._error(stream, code, str(exc))
                    return
                try:
                    request = decode_request(body)
                except ShardDecodeError as exc:
                    log.info("malformed shard request", extra=kv(peer=str(peer), error=str(exc)))
                    await self._error(stream, ErrorCode.BAD_REQUEST, str(exc))
                    return
                self.requests_served += 1
                if self._streams[peer] > self.max_streams_per_peer:
                    await self._error(stream, ErrorCode.BUSY, f"more than {self.max_streams_per_peer} streams")
                    return
                if self.is_halted(request.manifest_id):
                    await self._error(stream, ErrorCode.HALTED,
                                      f"model {request.manifest_id.hex()} is halted by the circuit breaker")
                    continue
                if isinstance(request, GetChunks):
                    await self._serve_chunks(stream, request)
                else:
                    await self._send(stream, await self._answer(request))
        finally:
            self._streams[peer] -= 1
            if self._streams[peer] <= 0:
                del self._streams[peer]

    async def _send(self, stream: INetStream, msg: Message) -> None:
        if isinstance(msg, Error):
            self.errors_sent[msg.code.name.lower()] += 1
        await write_frame(stream, encode_message(msg))

    async def _error(self, stream: INetStream, code: ErrorCode, message: str) -> None:
        await self._send(stream, Error(code, message.encode("utf-8")[:256].decode("utf-8", "ignore")))

    async def _manifest(self, manifest_id: bytes) -> Manifest | None:
        cached = self.store.cached_manifest(manifest_id)  # every GET_CHUNKS asks: no thread hop for a dict
        if cached is not None:
            return cached
        try:
            return await trio.to_thread.run_sync(self.store.get_manifest, manifest_id)
        except ManifestNotFound:
            return None

    async def _answer(self, request: GetManifest | Have) -> Message:
        mid = request.manifest_id
        try:
            if isinstance(request, GetManifest):
                return ManifestReply(await trio.to_thread.run_sync(self.store.get_manifest_bytes, mid))
            present = await trio.to_thread.run_sync(self.store.present, mid)
            return HaveReply(len(present), encode_bitmap((i for i, held in enumerate(present) if held), len(present)))
        except ManifestNotFound:
            return Error(ErrorCode.NOT_FOUND, f"no manifest {mid.hex()}")
        except ShardError as exc:
            log.warning("cannot serve manifest", extra=kv(id=mid.hex()[:16], error=str(exc)))
            return Error(ErrorCode.INTERNAL, "stored manifest unreadable")

    async def _serve_chunks(self, stream: INetStream, request: GetChunks) -> None:
        m = await self._manifest(request.manifest_id)
        if m is None:
            return await self._error(stream, ErrorCode.NOT_FOUND, f"no manifest {request.manifest_id.hex()}")
        count = m.chunk_count
        if request.indices[-1] >= count:
            return await self._error(stream, ErrorCode.BAD_REQUEST,
                                     f"chunk index {request.indices[-1]} is beyond the manifest's {count} chunks")
        if self._serving >= self.max_serving:
            return await self._error(stream, ErrorCode.BUSY, "serving too many requests; retry later")
        self._serving += 1
        try:
            await self._send_chunks(stream, request.manifest_id, list(request.indices), m.chunk_size)
        finally:
            self._serving -= 1

    async def _send_chunks(self, stream: INetStream, mid: bytes, indices: list[int], chunk_size: int) -> None:
        """CHUNK frames for ``indices`` then END (or ERROR internal at a corrupt chunk). The next
        group is read (and verified) in a thread of low priority (background.py) while the current
        one is written."""
        per_group = max(1, WRITE_BYTES // chunk_size)
        groups = [indices[i:i + per_group] for i in range(0, len(indices), per_group)]
        send, receive = trio.open_memory_channel[tuple[list[bytes], int, int, int | None]](1)
        failures: list[Exception] = []
        reader = LowPriorityThread("prsm serve read")  # background.py

        async def read_ahead() -> None:
            async with send:
                try:
                    for group in groups:
                        result = await reader.run(self._read_frames, mid, group)
                        await send.send(result)
                        if result[3] is not None:
                            return
                except Exception as exc:  # re-raised below, outside the nursery
                    failures.append(exc)

        corrupt: int | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_ahead)
                try:
                    async with receive:
                        async for parts, sent, sent_bytes, bad in receive:
                            corrupt = bad
                            self.chunks_served += sent
                            self.bytes_served += sent_bytes
                            for piece in pieces(parts, WRITE_PIECE):
                                await stream.write(piece)  # type: ignore[arg-type]  # yamux takes any buffer
                                TRAFFIC.bytes_out += len(piece)
                except Exception as exc:
                    failures.insert(0, exc)
                    nursery.cancel_scope.cancel()
        finally:
            reader.close()
        if failures:
            raise failures[0]
        if corrupt is not None:
            return await self._error(stream, ErrorCode.INTERNAL, f"chunk {corrupt} is damaged or unreadable here")
        await self._send(stream, End())

    def _read_frames(self, mid: bytes, group: list[int]) -> tuple[list[bytes], int, int, int | None]:
        """CHUNK frames for the held chunks of ``group`` (in a thread): the frames' parts (each
        frame's length and header, then its data: written as they are, see :func:`pieces`),
        how many chunks and bytes they carry, and the index of the first chunk that could not
        be read (corrupt on disk, or a disk error)."""
        parts: list[bytes] = []
        sent = sent_bytes = 0
        corrupt: int | None = None
        for i in group:
            try:
                data = self.store.read_chunk(mid, i)
            except ChunkNotFound:
                continue
            except (ShardError, OSError) as exc:  # CorruptChunk, a model removed meanwhile, a disk error
                log.warning("chunk not served", extra=kv(id=mid.hex()[:16], index=i, error=str(exc)))
                corrupt = i
                break
            head = chunk_header(i, len(data))
            parts += (encode_uvarint(len(head) + len(data)) + head, data)
            sent += 1
            sent_bytes += len(data)
        return parts, sent, sent_bytes, corrupt

    # ------------------------------------------------------------ publishing

    async def publish(self, path: Path, *, name: str, version: str, description: str = "", license: str = "",
                      tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
        """Build and sign the manifest, copy the files into the store (checked chunk by chunk),
        announce; returns the model's summary."""
        signing_key = self.key.signing_key

        def build() -> tuple[bytes, Manifest, int]:
            m = build_manifest(path, key=signing_key, name=name, version=version, description=description,
                               license=license, tags=tags or [], metadata=metadata, chunk_size=chunk_size)
            mid = hashlib.sha256(encode_manifest(m)).digest()
            existed = self.store.has_manifest(mid)
            self.store.add_manifest(m)
            try:
                written = self.store.import_files(m, source_files(path)[0])
            except BaseException:
                if not existed:
                    self.store.remove(mid)
                raise
            return mid, m, written

        mid, m, written = await trio.to_thread.run_sync(build)
        ipfs_blocks = await trio.to_thread.run_sync(self._put_to_ipfs, mid, m) if self.ipfs is not None else None
        announced = await self.providers.announce(mid)
        record = sign_record(signing_key, m.name, m.version, mid)
        stored = [await self.providers.put_value(k, encode_record(record)) for k in record.keys()]
        log.info("model published", extra=kv(id=mid.hex()[:16], name=m.name, version=m.version))
        return {
            **manifest_json(mid, m),
            "chunks_written": written,
            "announced_to": announced,
            "name_record": all(stored),
            "ipfs_blocks": ipfs_blocks,
        }

    def _put_to_ipfs(self, mid: bytes, m: Manifest) -> int:
        """Put every chunk of ``m`` to IPFS (in a thread); returns how many IPFS accepted."""
        assert self.ipfs is not None
        put = 0
        first = {h: i for i, h in reversed(list(enumerate(m.chunk_hashes())))}
        for i in first.values():
            put += self.ipfs.put(self.store.read_chunk(mid, i))
        return put

    # ------------------------------------------------------------ fetching

    def start_fetch(self, manifest_id: bytes) -> Fetch:
        """Start fetching ``manifest_id``, or return the fetch already running for it.

        Raises ModelHalted when the circuit breaker halted that model."""
        assert self._nursery is not None, "ShardService is not running"
        if self.is_halted(manifest_id):
            raise ModelHalted(f"model {manifest_id.hex()} is halted by the circuit breaker; it cannot be fetched")
        running = self.fetches.get(manifest_id)
        if running is not None and running.running:
            return running
        fetch = Fetch(manifest_id, host=self.host, kad=self.kad, store=self.store, providers=self.providers,
                      params=self.fetch_params,
                      is_halted=lambda mid: self.is_halted(mid), ipfs=self.ipfs)
        self.fetches[manifest_id] = fetch
        self._nursery.start_soon(fetch.run)
        return fetch

    async def fetch(self, manifest_id: bytes) -> Fetch:
        """Start or attach, and wait until the fetch ends (done, failed or cancelled)."""
        fetch = self.start_fetch(manifest_id)
        await fetch.done.wait()
        return fetch

    # ------------------------------------------------------------ local models

    async def remove(self, manifest_id: bytes) -> int:
        fetch = self.fetches.get(manifest_id)
        if fetch is not None and fetch.running:
            raise FetchBusy(f"model {manifest_id.hex()} is being fetched; cancel the fetch first")
        try:
            freed = await trio.to_thread.run_sync(self.store.remove, manifest_id)
        except ModelBusy as exc:
            raise FetchBusy(str(exc)) from None
        self.providers.withdraw(manifest_id)
        self.fetches.pop(manifest_id, None)
        return freed

    def statistics(self) -> dict[str, Any]:
        st = self.store.statistics()
        return {
            "chunks_served": self.chunks_served,
            "bytes_served": self.bytes_served,
            "requests_served": self.requests_served,
            "errors_sent": dict(self.errors_sent),
            "fetches_running": sum(f.running for f in self.fetches.values()),
            "store_chunks": st.chunks,
            "store_manifests": st.manifests,
            "store_usage": st.usage,
            "store_quota": st.quota,
        }


def manifest_json(mid: bytes, m: Manifest) -> dict[str, Any]:
    return {
        "id": mid.hex(),
        "name": m.name,
        "version": m.version,
        "description": m.description,
        "license": m.license,
        "tags": list(m.tags),
        "publisher": m.publisher.hex(),
        "created": m.created,
        "chunk_size": m.chunk_size,
        "chunks": m.chunk_count,
        "total_size": m.total_size,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256.hex(), "tensors": len(f.tensors)}
                  for f in m.files],
    }


def pieces(parts: list[bytes], size: int) -> Iterator[bytes | memoryview]:
    """The concatenation of ``parts`` cut into ``size``-byte pieces (the last may be shorter):
    a view where a piece lies within one part, joined bytes only where it spans parts (a
    chunk's end, the next frame's header, that chunk's start). So a group of chunks is written
    without first being joined into one buffer (a copy, and several MiB of fresh memory per
    group)."""
    carry: list[memoryview] = []
    held = 0
    for part in parts:
        view = memoryview(part)
        if held:
            take = view[:size - held]
            carry.append(take)
            held += len(take)
            view = view[len(take):]
            if held < size:
                continue
            yield b"".join(carry)
            carry, held = [], 0
        whole = len(view) - len(view) % size
        for start in range(0, whole, size):
            yield view[start:start + size]
        if whole < len(view):
            carry, held = [view[whole:]], len(view) - whole
    if held:
        yield carry[0] if len(carry) == 1 else b"".join(carry)

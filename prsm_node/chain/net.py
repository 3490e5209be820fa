"""The chain's wire protocols: ``/prsm/tx/1.0.0`` (submit, wait) and ``/prsm/sync/1.0.0``
(blocks with certificates), the forwarder that sends txs toward the validators, and the
follower's sync loop. See protocols/tx.md and protocols/sync.md.
"""

from __future__ import annotations

import logging
import random
import time

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IOException
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from .._trio import TaskStatus
from ..exceptions import DiscoveryError
from ..kad.service import Kademlia
from ..ledger.block import BlockRejected
from ..ledger.codec import decode_tx
from ..ledger.exceptions import DuplicateTx, LedgerDecodeError, TxRejected
from ..ledger.mempool import Pending
from ..ledger.types import Body, Tx
from ..logs import kv
from ..wire import FrameError, guarded_handler, read_frame, write_frame
from . import messages as m
from .service import ChainService

log = logging.getLogger(__name__)

TX = TProtocol(m.TX_PROTOCOL)
SYNC = TProtocol(m.SYNC_PROTOCOL)
MAX_REQUESTS_PER_STREAM = 256
INBOUND_IDLE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0
SYNC_WAIT_MS = 10_000
SYNC_BATCH = 64
SYNC_BACKOFF_MAX = 10.0
REBROADCAST_BATCH = 256


class ChainNet:
    def __init__(self, host: IHost, kad: Kademlia, chain: ChainService) -> None:
        self.host = host
        self.kad = kad
        self.chain = chain
        self.txs_received = 0
        self.txs_forwarded = 0
        self._links: dict[ID, _TxLink] = {}
        self.sync_errors = 0
        self.bad_blocks = 0
        self._preferred: ID | None = None
        self._validator_ids = set(chain.validator_peers.values())

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(TX, guarded_handler(m.TX_PROTOCOL, self._handle_tx))
        self.host.set_stream_handler(SYNC, guarded_handler(m.SYNC_PROTOCOL, self._handle_sync))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.chain.solo:
                # Followers, and validators until consensus produces blocks, follow the chain.
                nursery.start_soon(self._sync_loop)
            if not self.chain.is_validator:
                nursery.start_soon(self._rebroadcast_loop)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------ submitting

    async def submit(
        self, tx: Tx | None = None, *, body: Body | None = None, fee: int = 0, from_validator: bool = False
    ) -> Pending:
        """Admit a tx (from a peer or a client, or ``body`` signed by this node) and send it
        on toward the validators. A PBFT validator sends it to the other validators too
        (unless one of them sent it): each must time the request, so that a primary that
        ignores it is replaced."""
        entry = await self.chain.submit(tx, body=body, fee=fee)
        if not self.chain.solo and not (self.chain.is_validator and from_validator):
            self._nursery.start_soon(self._forward, entry)
        return entry

    async def _forward(self, entry: Pending) -> None:
        """To every validator at once: one that is down must not delay the others."""
        async with trio.open_nursery() as nursery:
            for account, peer in self.chain.validator_peers.items():
                if account != self.chain.account:
                    nursery.start_soon(self._forward_to, peer, entry)

    async def _forward_to(self, peer: str, entry: Pending) -> None:
        try:
            await self._send_submit(ID.from_base58(peer), entry.encoded)
            self.txs_forwarded += 1
        except (OSError, FrameError, m.MessageError, DiscoveryError, trio.TooSlowError) as exc:
            log.info("forward failed", extra=kv(peer=peer, tx=entry.hash.hex()[:16], error=str(exc)))

    async def _send_submit(self, peer: ID, encoded: bytes) -> None:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _TxLink(self, peer)
        reply = m.decode_submit_reply(await link.request(m.encode_submit(encoded)))
        if isinstance(reply, m.ErrorReply) and reply.code != DuplicateTx.code:
            log.info("validator refused a tx", extra=kv(peer=str(peer), code=reply.code, error=reply.message))

    async def _open(self, peer: ID, protocol: TProtocol) -> INetStream:
        if peer not in self.host.get_network().connections:
            await self.kad.find_peer(peer)
        try:
            return await self.host.new_stream(peer, [protocol])
        except Exception as exc:  # py-libp2p raises many types, some grouped
            raise DiscoveryError(f"cannot open {protocol} to {peer}: {exc!r}") from None

    async def _request(self, peer: ID, protocol: TProtocol, body: bytes, limit: int, seconds: float = 0) -> bytes:
        with trio.fail_after(seconds or REQUEST_TIMEOUT):
            stream = await self._open(peer, protocol)
            try:
                await write_frame(stream, body)
                return await read_frame(stream, limit)
            except StreamEOF:
                raise FrameError(f"{peer} closed the stream without a reply") from None
            finally:
                with trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:  # the peer may be gone; nothing left to close
                        pass

    async def _rebroadcast_loop(self) -> None:
        """A follower sends its txs that no block has taken yet to the validators again
        (a validator that restarted has an empty mempool)."""
        interval = self.chain.cfg.rebroadcast_interval
        while True:
            await trio.sleep(interval)
            old = time.monotonic() - interval
            for entry in [p for p in self.chain.mempool.pending() if p.received <= old][:REBROADCAST_BATCH]:
                await self._forward(entry)

    # ------------------------------------------------------------ serving /prsm/tx

    async def _handle_tx(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        for _ in range(MAX_REQUESTS_PER_STREAM):
            try:
                with trio.fail_after(INBOUND_IDLE_TIMEOUT):
                    body = await read_frame(stream, m.MAX_TX_REQUEST)
            except StreamEOF:
                return
            try:
                request = m.decode_tx_request(body)
            except m.MessageError as exc:
                log.info("malformed tx request", extra=kv(peer=str(peer), error=str(exc)))
                await write_frame(stream, m.encode_error("malformed", str(exc)))
                return
            if isinstance(request, m.Submit):
                await write_frame(stream, await self._answer_submit(request.tx, peer))
            else:
                await write_frame(stream, await self._answer_wait(request))

    async def _answer_submit(self, data: bytes, peer: ID) -> bytes:
        self.txs_received += 1
        try:
            entry = await self.submit(decode_tx(data), from_validator=str(peer) in self._validator_ids)
        except (TxRejected, LedgerDecodeError) as exc:
            log.debug("tx refused", extra=kv(peer=str(peer), code=exc.code, error=str(exc)))
            return m.encode_error(exc.code, str(exc))
        return m.encode_submitted(entry.hash)

    async def _answer_wait(self, request: m.Wait) -> bytes:
        with trio.move_on_after(request.timeout_ms / 1000):
            found = await self.chain.wait_committed(request.tx_hash)
            return m.encode_committed(request.tx_hash, found.height, found.block_hash)
        code = "timeout" if request.tx_hash in self.chain.mempool else "not_found"
        return m.encode_error(code, f"tx {request.tx_hash.hex()} not committed after {request.timeout_ms} ms")

    # ------------------------------------------------------------ serving /prsm/sync

    async def _handle_sync(self, stream: INetStream) -> None:
        for _ in range(MAX_REQUESTS_PER_STREAM):
            try:
                with trio.fail_after(INBOUND_IDLE_TIMEOUT):
                    body = await read_frame(stream, m.MAX_SYNC_REQUEST)
            except StreamEOF:
                return
            try:
                request = m.decode_sync_request(body)
            except m.MessageError as exc:
                await write_frame(stream, m.encode_error("malformed", str(exc)))
                return
            if request.start == 0:
                await write_frame(stream, m.encode_error("bad_request", "heights start at 1"))
                return
            if request.start > self.chain.tip.height:
                with trio.move_on_after(request.wait_ms / 1000):
                    await self.chain.wait_height(request.start)
            await write_frame(stream, self._blocks_reply(request.start, max(1, request.count)))

    def _blocks_reply(self, start: int, count: int) -> bytes:
        blocks: list[tuple[bytes, bytes]] = []
        size = 0
        for height in range(start, min(start + count, self.chain.tip.height + 1)):
            found = self.chain.block_and_cert(height)
            if found is None:
                break
            size += len(found[0]) + len(found[1])
            if blocks and size > m.MAX_SYNC_REPLY - 64 * 1024:
                break
            blocks.append(found)
        return m.encode_blocks(self.chain.tip.height, blocks)

    # ------------------------------------------------------------ following

    def _sync_sources(self) -> list[ID]:
        """The last source that worked, then validators (they hold every block), then any
        connected peer; a validator that is down only costs a try after a failure."""
        validators = [ID.from_base58(p) for a, p in self.chain.validator_peers.items() if a != self.chain.account]
        random.shuffle(validators)
        others = [p for p in self.host.get_network().connections if p not in validators]
        random.shuffle(others)
        first = [self._preferred] if self._preferred is not None else []
        return first + [p for p in validators + others if p != self._preferred]

    async def _sync_loop(self) -> None:
        """Long-poll a source for the next blocks; apply each after checking it."""
        backoff = 0.5
        while True:
            progressed = False
            for peer in self._sync_sources():
                try:
                    progressed = await self._sync_from(peer)
                except (OSError, IOException, FrameError, m.MessageError, DiscoveryError, trio.TooSlowError) as exc:
                    self.sync_errors += 1
                    self._preferred = None if self._preferred == peer else self._preferred
                    log.debug("sync failed", extra=kv(peer=str(peer), error=str(exc)))
                    continue
                except (BlockRejected, LedgerDecodeError) as exc:
                    self.sync_errors += 1
                    self.bad_blocks += 1
                    self._preferred = None if self._preferred == peer else self._preferred
                    log.warning("peer sent a bad block", extra=kv(peer=str(peer), error=str(exc)))
                    continue
                if progressed:
                    self._preferred = peer
                    break  # else: a source that claims more blocks than it sends; try the next
            if progressed:
                backoff = 0.5
            else:
                await trio.sleep(backoff * random.uniform(0.75, 1.25))
                backoff = min(backoff * 2, SYNC_BACKOFF_MAX)

    async def _sync_from(self, peer: ID) -> bool:
        """One long-poll round with ``peer``; True when at least one block was applied or the
        peer confirmed we are at its tip."""
        start = self.chain.tip.height + 1
        body = m.encode_get_blocks(start, SYNC_BATCH, SYNC_WAIT_MS)
        data = await self._request(peer, SYNC, body, m.MAX_SYNC_REPLY, REQUEST_TIMEOUT + SYNC_WAIT_MS / 1000)
        reply = m.decode_blocks_reply(data)
        if isinstance(reply, m.ErrorReply):
            raise FrameError(f"{reply.code}: {reply.message}")
        tip, blocks = reply
        await self.chain.apply_synced(blocks)
        return bool(blocks) or tip <= self.chain.tip.height

    def statistics(self) -> dict[str, int]:
        return {
            "txs_received": self.txs_received,
            "txs_forwarded": self.txs_forwarded,
            "sync_errors": self.sync_errors,
            "bad_blocks": self.bad_blocks,
        }


class _TxLink:
    """One reused ``/prsm/tx/1.0.0`` stream to a validator for forwarded txs: opening a stream
    costs two multistream round trips (~5 ms), far more than a SUBMIT. Requests on it take
    turns; a stream that the peer closed (request limit, idle timeout, restart) is replaced
    once, transparently."""

    def __init__(self, net: ChainNet, peer: ID) -> None:
        self._net = net
        self._peer = peer
        self._stream: INetStream | None = None
        self._used = 0
        self._lock = trio.Lock()

    async def request(self, body: bytes) -> bytes:
        async with self._lock:
            with trio.fail_after(REQUEST_TIMEOUT):
                for attempt in range(2):
                    if self._stream is None or self._used >= MAX_REQUESTS_PER_STREAM - 1:
                        await self._drop()
                        self._stream = await self._net._open(self._peer, TX)
                        self._used = 0
                    try:
                        await write_frame(self._stream, body)
                        reply = await read_frame(self._stream, m.MAX_REPLY)
                    except (StreamEOF, FrameError, OSError, IOException) as exc:
                        await self._drop()
                        if attempt:
                            raise FrameError(f"{self._peer}: {exc!r}") from None
                        continue
                    except BaseException:
                        await self._drop()  # cancelled or failed mid-request: out of step
                        raise
                    self._used += 1
                    return reply
        raise AssertionError("unreachable")

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.reset()
                except Exception:  # the peer may be gone already
                    pass

"""The chain's wire protocols: ``/prsm/tx/1.0.0`` (submit, wait) and ``/prsm/sync/1.0.0``
(blocks with certificates), the forwarder that sends txs toward the validators, and the
follower's sync loop. See protocols/tx.md and protocols/sync.md.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import random
import time
from collections.abc import Callable

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
from ..ledger.exceptions import BadNonce, DuplicateTx, LedgerDecodeError, MempoolFull, TooManyPending, TxRejected
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
# A follower at its source's tip costs the source one request per block or per SYNC_WAIT_MS;
# below INBOUND_IDLE_TIMEOUT, so the stream is never reset as idle between requests.
SYNC_WAIT_MS = 25_000
SYNC_BATCH = 64
SYNC_BACKOFF_MAX = 10.0
CONSENSUS_SYNC_POLL = 1.0  # seconds a PBFT validator's tip must stand still before it polls
REBROADCAST_BATCH = 256
MAX_FORWARD_QUEUE = 65536  # txs waiting on one validator link
# Refusals for load, and the gap such a refusal leaves: sent again after the next block
RETRY_CODES = frozenset({MempoolFull.code, TooManyPending.code, BadNonce.code})
RETRY_WAIT = 1.0  # most seconds a link waits for a block before it sends refused txs again


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
        self._sync: _ReusedStream | None = None  # the follower's GET_BLOCKS stream (_sync_request)
        self._sync_opened_before = 0  # streams opened to earlier sync sources
        # The account of the PBFT primary of this validator's active view (ConsensusService.
        # active_primary), or None: then admitted txs go to every validator.
        self.primary: Callable[[], bytes | None] | None = None
        chain.backlog_shares = self._backlog_shares

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
        on toward the validators (``_forward``), unless a validator sent it here."""
        entry = await self.chain.submit(tx, body=body, fee=fee, from_validator=from_validator)
        if self._forwards(from_validator):
            self._forward([entry])
        return entry

    async def submit_many(self, txs: list[Tx], *, from_validator: bool = False) -> list[Pending | TxRejected]:
        """Admit many txs at once (``ChainService.submit_many``) and forward those admitted
        like ``submit``. Returns, per tx, its mempool entry or why it was refused."""
        results = await self.chain.submit_many(txs, from_validator=from_validator)
        admitted = [r for r in results if isinstance(r, Pending)]
        if admitted and self._forwards(from_validator):
            self._forward(admitted)
        return results

    def _forwards(self, from_validator: bool) -> bool:
        return not self.chain.solo and not (self.chain.is_validator and from_validator)

    def _forward(self, entries: list[Pending]) -> None:
        """Queue the txs on the link to each validator of ``_forward_peers``; each link sends
        its queue in SUBMIT_MANY batches from its own task, so a validator that is down delays
        no one."""
        encoded = [e.encoded for e in entries]
        for peer in self._forward_peers():
            self._link(peer).enqueue(encoded)

    def _forward_peers(self) -> list[ID]:
        """A PBFT validator in an active view sends the txs it admits to that view's primary
        only (none when it is the primary): the backups get them in the PRE-PREPARE, as in
        Castro-Liskov, and a request that waits too long is broadcast by the replica's
        retransmission, so that every replica times it (protocols/pbft.md rule 18). Anyone
        else (a follower, or a validator while views change) sends them to every validator."""
        primary = self._active_primary()
        if primary is not None:
            if primary == self.chain.account:
                return []
            peer = self.chain.validator_peers.get(primary)
            if peer is not None:
                return [ID.from_base58(peer)]
        return [ID.from_base58(p) for a, p in self.chain.validator_peers.items() if a != self.chain.account]

    def _active_primary(self) -> bytes | None:
        """The primary of this validator's active PBFT view (None: not a validator, no view)."""
        return self.primary() if self.primary is not None and self.chain.is_validator else None

    def _backlog_shares(self) -> int:
        """How many validators' clients share the backlog: all of them when this validator
        sends its txs to another one, the primary (whose mempool holds everyone's)."""
        primary = self._active_primary()
        if primary is None or primary == self.chain.account:
            return 1
        return len(self.chain.validator_peers)

    def forward_pending(self) -> None:
        """A new view is active: send every tx this node holds to its primary (the primary
        of the old view may have held them alone, and lost them)."""
        if self.chain.is_validator and not self.chain.solo:
            pending = list(self.chain.mempool.pending())
            if pending:
                self._forward(pending)

    def _link(self, peer: ID) -> _TxLink:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _TxLink(self, peer)
            self._nursery.start_soon(link.run)
        return link

    async def _open(self, peer: ID, protocol: TProtocol) -> INetStream:
        if peer not in self.host.get_network().connections:
            await self.kad.find_peer(peer)
        try:
            return await self.host.new_stream(peer, [protocol])
        except Exception as exc:  # py-libp2p raises many types, some grouped
            raise DiscoveryError(f"cannot open {protocol} to {peer}: {exc!r}") from None

    async def _rebroadcast_loop(self) -> None:
        """A follower sends its txs that no block has taken yet to the validators again
        (a validator that restarted has an empty mempool)."""
        interval = self.chain.cfg.rebroadcast_interval
        while True:
            await trio.sleep(interval)
            old = time.monotonic() - interval
            due = [p for p in self.chain.mempool.pending() if p.received <= old][:REBROADCAST_BATCH]
            if due:
                self._forward(due)

    # ------------------------------------------------------------ serving /prsm/tx

    async def _handle_tx(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        for _ in range(MAX_REQUESTS_PER_STREAM):
            try:
                with trio.fail_after(INBOUND_IDLE_TIMEOUT):
                    body = await read_frame(stream, m.MAX_TX_REQUESTS)
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
            elif isinstance(request, m.SubmitMany):
                await write_frame(stream, await self._answer_submit_many(request.txs, peer))
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

    async def _answer_submit_many(self, items: tuple[bytes, ...], peer: ID) -> bytes:
        self.txs_received += len(items)
        codes: list[str | None] = [None] * len(items)
        txs: list[Tx] = []
        where: list[int] = []
        for i, data in enumerate(items):
            try:
                txs.append(decode_tx(data))
                where.append(i)
            except LedgerDecodeError as exc:
                codes[i] = exc.code
        results = await self.submit_many(txs, from_validator=str(peer) in self._validator_ids)
        for i, result in zip(where, results, strict=True):
            if not isinstance(result, Pending):
                codes[i] = result.code
        return m.encode_submitted_many(codes)

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
        """Long-poll a source for the next blocks; apply each after checking it. A PBFT
        validator gets its blocks from consensus: it polls only to catch up, when its tip has
        stood still for CONSENSUS_SYNC_POLL (or the last poll brought blocks). Polling while
        consensus commits would fetch, decode and check each block a second time (and, with
        the tip moving during every poll, poll again at once, a stream per poll)."""
        backoff = 0.5
        caught_up = True  # the last poll brought no block
        while True:
            if self.chain.consensus_running and caught_up:
                await self._wait_tip_still(CONSENSUS_SYNC_POLL)
            progressed = False
            caught_up = True
            for peer in self._sync_sources():
                try:
                    progressed, applied = await self._sync_from(peer)
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
                    caught_up = not applied
                    break  # else: a source that claims more blocks than it sends; try the next
            if progressed:
                backoff = 0.5
            else:
                await trio.sleep(backoff * random.uniform(0.75, 1.25))
                backoff = min(backoff * 2, SYNC_BACKOFF_MAX)

    async def _wait_tip_still(self, seconds: float) -> None:
        """Return once the tip has not moved for ``seconds``."""
        while True:
            height = self.chain.tip.height
            await trio.sleep(seconds)
            if self.chain.tip.height == height:
                return

    async def _sync_from(self, peer: ID) -> tuple[bool, int]:
        """One long-poll round with ``peer``: (progressed, blocks applied); progressed when
        the peer sent blocks (all applied) or confirmed we are at its tip."""
        start = self.chain.tip.height + 1
        # A validator whose consensus runs gets each block from PBFT; it only polls, to catch
        # up when it fell behind (a long-poll would fetch, decode and drop every block again).
        wait_ms = 0 if self.chain.consensus_running else SYNC_WAIT_MS
        body = m.encode_get_blocks(start, SYNC_BATCH, wait_ms)
        data = await self._sync_request(peer, body, REQUEST_TIMEOUT + wait_ms / 1000)
        reply = m.decode_blocks_reply(data)
        if isinstance(reply, m.ErrorReply):
            raise FrameError(f"{reply.code}: {reply.message}")
        tip, blocks = reply
        applied = await self.chain.apply_synced(blocks)
        return bool(blocks) or tip <= self.chain.tip.height, applied

    async def _sync_request(self, peer: ID, body: bytes, seconds: float) -> bytes:
        """One GET_BLOCKS to ``peer`` on the sync stream kept open to it (see _ReusedStream).

        A follower long-polls its source for as long as it runs, one request per block or per
        ``wait_ms``: a fresh stream for each (two multistream round trips, yamux and Noise
        frames, a handler task on the source) made the sync loop most of an idle devnet
        validator's CPU, with every follower polling it."""
        if self._sync is None or self._sync.peer != peer:
            if self._sync is not None:
                self._sync_opened_before += self._sync.opened
                await self._sync.drop()
            self._sync = _ReusedStream(self, peer, SYNC, m.MAX_SYNC_REPLY)
        with trio.fail_after(seconds):
            return await self._sync.request(body)

    @property
    def sync_streams_opened(self) -> int:
        return self._sync_opened_before + (self._sync.opened if self._sync is not None else 0)

    def statistics(self) -> dict[str, int]:
        return {
            "txs_received": self.txs_received,
            "txs_forwarded": self.txs_forwarded,
            "txs_retried": sum(link.retried for link in self._links.values()),
            "sync_errors": self.sync_errors,
            "bad_blocks": self.bad_blocks,
            "sync_streams_opened": self.sync_streams_opened,
        }


class _TxLink:
    """One reused ``/prsm/tx/1.0.0`` stream to a validator for forwarded txs: opening a stream
    costs two multistream round trips (~5 ms), far more than a request. Txs to forward queue
    here and go out in SUBMIT_MANY batches from the link's own task: a batch takes whatever
    queued while the previous one was in flight, so under load batches grow and each costs
    one round trip. A stream that the peer closed (request limit, idle timeout, restart) is
    replaced once, transparently; a batch that still fails is dropped (logged): followers
    rebroadcast, and a validator's replica retransmits requests the primary seems to lack."""

    def __init__(self, net: ChainNet, peer: ID) -> None:
        self._net = net
        self._peer = peer
        self._stream = _ReusedStream(net, peer, TX, m.MAX_MANY_REPLY)
        self._lock = trio.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = trio.Event()
        self.dropped = 0
        self.retried = 0

    def enqueue(self, encoded: list[bytes]) -> None:
        self._queue.extend(encoded)
        overflow = len(self._queue) - MAX_FORWARD_QUEUE
        if overflow > 0:
            for _ in range(overflow):
                self._queue.popleft()
            self.dropped += overflow
            log.warning("forward queue full: oldest txs dropped", extra=kv(peer=str(self._peer), dropped=overflow))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                batch: list[bytes] = []
                size = 0
                while self._queue and len(batch) < m.MAX_SUBMIT_MANY:
                    if size + len(self._queue[0]) > m.MAX_SUBMIT_MANY_BYTES:
                        break
                    size += len(self._queue[0])
                    batch.append(self._queue.popleft())
                await self._send(batch)

    async def _send(self, batch: list[bytes]) -> None:
        net = self._net
        try:
            reply = m.decode_submit_many_reply(await self.request(m.encode_submit_many(batch)), len(batch))
        except (OSError, FrameError, m.MessageError, DiscoveryError, trio.TooSlowError) as exc:
            self.dropped += len(batch)
            log.info("forward failed", extra=kv(peer=str(self._peer), txs=len(batch), error=str(exc)))
            return
        if isinstance(reply, m.ErrorReply):
            self.dropped += len(batch)
            log.info("validator refused a batch", extra=kv(peer=str(self._peer), code=reply.code, error=reply.message))
            return
        net.txs_forwarded += len(batch)
        refused = collections.Counter(c for c in reply if c not in (None, DuplicateTx.code, *RETRY_CODES))
        if refused:
            log.info("validator refused txs", extra=kv(peer=str(self._peer), codes=dict(refused)))
        retry = [tx for tx, code in zip(batch, reply, strict=True) if code in RETRY_CODES]
        if retry:
            await self._retry(retry)

    async def _retry(self, txs: list[bytes]) -> None:
        """The validator turned ``txs`` away for load (a full mempool or sender queue, or the
        nonce gap that left): after its next block (or RETRY_WAIT), those this node still
        holds go out again, ahead of what queued meanwhile. The ones it no longer holds were
        committed (a bad_nonce can also mean that) or dropped. A backup sends its clients'
        txs to the primary alone, so they must not be lost to a passing overload."""
        chain = self._net.chain
        with trio.move_on_after(RETRY_WAIT):
            await chain.wait_height(chain.tip.height + 1)
        again = [tx for tx in txs if hashlib.sha256(tx).digest() in chain.mempool]
        self._queue.extendleft(reversed(again))
        self.retried += len(again)

    async def request(self, body: bytes) -> bytes:
        async with self._lock:
            with trio.fail_after(REQUEST_TIMEOUT):
                return await self._stream.request(body)


class _ReusedStream:
    """One stream to ``peer`` on ``protocol`` that carries request after request (a frame out,
    a frame back), opened when first needed: opening a stream costs two multistream round
    trips, yamux and Noise frames and a handler task on the peer, far more than a request.
    A reused stream that fails (the peer closed it after MAX_REQUESTS_PER_STREAM, reset it as
    idle, or restarted) is replaced once, transparently; a fresh one that fails raises
    FrameError. A request cancelled or failed midway drops the stream (it is out of step).
    One request at a time: callers serialise."""

    def __init__(self, net: ChainNet, peer: ID, protocol: TProtocol, reply_limit: int) -> None:
        self._net = net
        self.peer = peer
        self._protocol = protocol
        self._reply_limit = reply_limit
        self._stream: INetStream | None = None
        self._used = 0
        self.opened = 0  # streams opened so far

    async def request(self, body: bytes) -> bytes:
        for _ in range(2):
            fresh = self._stream is None or self._used >= MAX_REQUESTS_PER_STREAM - 1
            if fresh:
                await self.drop()
                self._stream = await self._net._open(self.peer, self._protocol)
                self._used = 0
                self.opened += 1
            assert self._stream is not None
            try:
                await write_frame(self._stream, body)
                reply = await read_frame(self._stream, self._reply_limit)
            except (StreamEOF, FrameError, OSError, IOException) as exc:
                await self.drop()
                if fresh:
                    raise FrameError(f"{self.peer}: {exc!r}") from None
                continue
            except BaseException:
                await self.drop()  # cancelled or failed mid-request: out of step
                raise
            self._used += 1
            return reply
        raise AssertionError("unreachable")

    async def drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.reset()
                except Exception:  # the peer may be gone already
                    pass

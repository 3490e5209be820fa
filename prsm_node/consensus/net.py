"""Direct streams between validators on ``/prsm/pbft/1.0.0`` (protocols/pbft.md, "Transport").

Each validator keeps one outbound stream to every other validator, opened on first use and
reopened with exponential backoff after a failure; messages for a validator that is down are
dropped (PBFT retransmits through STATUS). Inbound streams are accepted only from the genesis
validators' peer ids; every frame goes to the consensus service's inbox, which decodes and
checks it. A validator whose messages keep failing those checks is penalised: its streams
are refused for a while.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from .._trio import TaskStatus
from ..kad.service import Kademlia
from ..logs import kv
from ..wire import guarded_handler, read_frame, write_frame
from .messages import MAX_MESSAGE_SIZE, PROTOCOL_ID

log = logging.getLogger(__name__)

PBFT = TProtocol(PROTOCOL_ID)
OUTBOX_SIZE = 1024
CONNECT_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.25
BACKOFF_MAX = 5.0
PENALTY_LIMIT = 20  # invalid messages ...
PENALTY_WINDOW = 10.0  # ... within this many seconds get the sender's streams refused
BAN_SECONDS = 10.0

Inbox = trio.MemorySendChannel[tuple[Any, ...]]


class PbftNet:
    def __init__(self, host: IHost, kad: Kademlia, peers: dict[bytes, str], me: bytes, inbox: Inbox) -> None:
        self.host = host
        self.kad = kad
        self.peers = {acct: ID.from_base58(pid) for acct, pid in peers.items() if acct != me}
        self._by_peer = {pid: acct for acct, pid in self.peers.items()}
        self._inbox = inbox
        self._outboxes: dict[bytes, trio.MemorySendChannel[bytes]] = {}
        self.last_heard: dict[bytes, float] = {}
        self.connected: dict[bytes, bool] = {acct: False for acct in self.peers}
        self.invalid: dict[bytes, int] = {}
        self._recent_invalid: dict[bytes, list[float]] = {}
        self._banned_until: dict[bytes, float] = {}
        self.sent = 0
        self.dropped = 0
        self.received = 0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for acct in self.peers:
                send, recv = trio.open_memory_channel[bytes](OUTBOX_SIZE)
                self._outboxes[acct] = send
                nursery.start_soon(self._sender, acct, recv)
            self.host.set_stream_handler(PBFT, guarded_handler(PROTOCOL_ID, self._handle))
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------ sending

    def send(self, to: bytes | None, data: bytes) -> None:
        """Queue ``data`` for validator ``to`` (None: every other validator); never blocks."""
        targets: Iterable[bytes] = self.peers if to is None else [to]
        for acct in targets:
            box = self._outboxes.get(acct)
            if box is None:
                continue
            try:
                box.send_nowait(data)
            except trio.WouldBlock:
                self.dropped += 1

    async def _sender(self, acct: bytes, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        peer = self.peers[acct]
        stream: INetStream | None = None
        backoff = BACKOFF_INITIAL
        down_until = 0.0
        async for data in recv:
            if stream is None:
                if trio.current_time() < down_until:
                    self.dropped += 1
                    continue
                stream = await self._open(peer)
                if stream is None:
                    down_until = trio.current_time() + backoff * random.uniform(0.75, 1.25)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    self.connected[acct] = False
                    self.dropped += 1
                    continue
                backoff = BACKOFF_INITIAL
                self.connected[acct] = True
            try:
                with trio.fail_after(WRITE_TIMEOUT):
                    await write_frame(stream, data)
                self.sent += 1
            except Exception as exc:  # a dead stream: reopen it for the next message
                log.debug("pbft send failed", extra=kv(peer=str(peer), error=repr(exc)))
                self.dropped += 1
                self.connected[acct] = False
                await _reset(stream)
                stream = None

    async def _open(self, peer: ID) -> INetStream | None:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                if peer not in self.host.get_network().connections:
                    await self.kad.find_peer(peer)
                return await self.host.new_stream(peer, [PBFT])
        except Exception as exc:  # py-libp2p raises many types, some grouped; DiscoveryError, TooSlowError
            log.debug("pbft connect failed", extra=kv(peer=str(peer), error=repr(exc)))
            return None

    # ------------------------------------------------------------ receiving

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        acct = self._by_peer.get(peer)
        if acct is None:
            log.info("pbft stream from a non-validator refused", extra=kv(peer=str(peer)))
            return
        if time.monotonic() < self._banned_until.get(acct, 0.0):
            return
        while True:
            try:
                data = await read_frame(stream, MAX_MESSAGE_SIZE)
            except StreamEOF:
                return
            self.received += 1
            self.last_heard[acct] = time.time()
            await self._inbox.send(("msg", acct, data))
            if time.monotonic() < self._banned_until.get(acct, 0.0):
                return  # penalised while this stream was open: drop it

    def penalise(self, acct: bytes, why: str) -> None:
        """``acct`` sent a message that failed its checks: log it and count it; too many in
        a short time and its streams are refused for ``BAN_SECONDS``."""
        count = self.invalid.get(acct, 0) + 1
        self.invalid[acct] = count
        if count == 1 or count % 100 == 0:
            peer = str(self.peers.get(acct, "?"))
            log.warning("invalid pbft message", extra=kv(peer=peer, count=count, error=why))
        now = time.monotonic()
        recent = [t for t in self._recent_invalid.get(acct, []) if t > now - PENALTY_WINDOW] + [now]
        self._recent_invalid[acct] = recent
        if len(recent) >= PENALTY_LIMIT and now >= self._banned_until.get(acct, 0.0):
            self._banned_until[acct] = now + BAN_SECONDS
            log.warning(
                "validator penalised: its streams are refused",
                extra=kv(peer=str(self.peers.get(acct, "?")), seconds=BAN_SECONDS),
            )

    def banned(self, acct: bytes) -> bool:
        return time.monotonic() < self._banned_until.get(acct, 0.0)


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:  # already dead
        pass

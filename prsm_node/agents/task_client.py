"""The client (payer) side of ``/prsm/task/1.0.0`` (protocols/task.md): ``list_models``,
``run_remote`` (RUN → check the charge → sign → PAY → PAID) and ``deliver`` (royalty receipts
from an executor to the publisher's node), plus what both sides share: the error a client sees,
the limits, and the receipts a charge is paid with.

A client runs at most ``max_tasks_per_peer`` tasks at once on one executor (the executor's own
admission limit): more wait here for a slot instead of being refused ``busy`` there, and
``outstanding(peer)`` tells the router how loaded each executor is from this node's side.
Requests for one model on one executor that wait for a slot together go out together: one
RUN_BATCH (one authorisation, one frame, one charge, one PAY) carries them all, so a node
under load pays the protocol's per-task costs (stream round trips, signatures, receipts,
settlement) once per batch rather than once per request. A request alone goes out as a RUN.
Streams are reused: a request goes on an idle stream to its peer when there is one (opening a
stream costs two multistream round trips and most of a small task's time).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from ..exceptions import DiscoveryError
from ..keys import NodeKey
from ..ledger.signing import sign_receipt
from ..ledger.types import Receipt
from ..logs import kv
from ..wire import FrameError, read_frame, write_frame
from . import task_messages as m
from .exceptions import AgentError
from .inputs import Usage
from .pricing import DEFAULT_PRICE_PER_UNIT, Charge, charge_for, units

log = logging.getLogger(__name__)

TASK = TProtocol(m.PROTOCOL_ID)
LIVENESS_INTERVAL = 1.0  # while a remote task runs, its executor is probed this often
LIVENESS_TIMEOUT = 3.0
LIVENESS_FAILURES = 3  # probes in a row that fail before a connected executor is given up
STREAM_REUSES = 48  # requests on one stream (an executor serves at most 64 on one)
STREAM_IDLE_S = 5.0  # a pooled stream idle longer is closed, not reused (executors close idle ones)
BATCH_REQUEST_BYTES = m.MAX_REQUEST // 2  # packed inputs of one RUN_BATCH, leaving room for the rest
BATCH_REPLY_BYTES = m.MAX_REPLY // 2  # the outputs a RUN_BATCH may bring back, estimated
OTHER_REPLY_BYTES = 8 * 1024  # a generated text or a classifier's labels, at most
_T = TypeVar("_T")


class TaskFailed(AgentError):
    """Raised to a client when a remote task did not produce a paid result: the peer answered
    an error (``code``), broke the protocol, or could not be reached; and to a local run whose
    model was halted (``halted``)."""

    def __init__(self, code: str, message: str, *, stale: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.stale = stale  # the stream failed before an answer came: the request may be sent again


@dataclass(frozen=True)
class TaskLimits:
    max_tasks_per_peer: int = 4
    max_tasks: int = 64
    pay_timeout: float = 10.0
    default_hold: float = 60.0  # an unpaid task blocks its payer this long after PAY was due
    run_timeout: float = 120.0
    request_timeout: float = 10.0
    idle_timeout: float = 30.0
    auth_ttl: int = 300  # seconds an authorisation the client signs stays valid
    default_price_per_unit: int = DEFAULT_PRICE_PER_UNIT


@dataclass(frozen=True)
class RemoteOutcome:
    """One request's result. Batched, ``charge`` is this request's share of the task's charge
    (its own units at the task's price) and ``receipts`` pay the whole task (``batch`` requests)."""

    output: Any
    usage: Usage
    charge: Charge
    receipts: tuple[Receipt, ...]
    ms: float
    batch: int = 1


@dataclass(eq=False)
class _Item:
    """A request waiting to go out in a batch, and then its outcome."""

    inputs: dict[str, Any]
    packed: bytes
    reply_bytes: int
    max_amount: int
    done: trio.Event = field(default_factory=trio.Event)
    outcome: RemoteOutcome | TaskFailed | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Lane:
    """The requests for one model on one executor: queued, then sent in batches by one task."""

    queue: deque[_Item] = field(default_factory=deque)
    wakeup: trio.Event = field(default_factory=trio.Event)
    running: int = 0


def _reply_bytes(entry: m.CatalogueEntry, inputs: dict[str, Any]) -> int:
    """A bound of the reply size of ``inputs`` (embedders: msgpack float64 vectors)."""
    texts = inputs.get("texts")
    if isinstance(texts, list):
        config = entry.architecture.get("config")
        dim = config.get("dim") if isinstance(config, dict) else None
        return len(texts) * (9 * (dim if type(dim) is int and 0 < dim <= 4096 else 4096) + 3) + 64
    return OTHER_REPLY_BYTES


def account_of(peer: ID) -> bytes:
    key = peer.extract_public_key()
    if key is None:
        raise TaskFailed("unreachable", f"peer id {peer} does not embed its public key")
    return bytes(key.to_bytes())


def peer_of(account: bytes) -> ID:
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(account))


def sign_auth(key: NodeKey, auth: m.Authorisation) -> m.Authorisation:
    return replace(auth, signature=key.signing_key.sign(auth.signing_payload()).signature)


def expected_receipts(task_id: bytes, payer: bytes, executor: bytes, charge: Charge, chain_id: str) -> list[Receipt]:
    """The unsigned receipts that pay ``charge``: one to the executor, one to a third-party
    publisher when its share is positive. Zero amounts get no receipt."""
    rid_exec, rid_pub = m.receipt_ids(task_id)
    out = []
    if charge.executor_amount:
        out.append(Receipt(rid_exec, payer, executor, charge.executor_amount, chain_id))
    if charge.publisher_amount:
        out.append(Receipt(rid_pub, payer, charge.publisher, charge.publisher_amount, chain_id))
    return out


@dataclass(eq=False)
class _Pooled:
    stream: INetStream
    uses: int = 0
    idle_since: float = 0.0


class TaskClient:
    """The payer's half of the protocol; TaskService is both halves."""

    host: IHost
    kad: Any
    key: NodeKey
    account: bytes
    chain_id: str
    royalty: Fraction
    limits: TaskLimits
    _nursery: trio.Nursery | None  # where batches are sent from (the service's); None: no batching

    def _init_client(self) -> None:
        self._slots: dict[ID, trio.CapacityLimiter] = {}
        self._outstanding: Counter[ID] = Counter()
        self._lanes: dict[tuple[ID, bytes], _Lane] = {}
        self._pool: dict[ID, list[_Pooled]] = {}  # idle streams per executor, most recent last
        self.batches_sent = 0
        self.batched_requests = 0

    def outstanding(self, peer: ID) -> int:
        """Requests this node has running on ``peer`` or waiting to go there."""
        return self._outstanding.get(peer, 0)

    def _slots_of(self, peer: ID) -> trio.CapacityLimiter:
        return self._slots.setdefault(peer, trio.CapacityLimiter(self.limits.max_tasks_per_peer))

    async def _checkout(self, peer: ID) -> tuple[_Pooled, bool]:
        """A stream to ``peer``: an idle one from the pool when there is one still fresh
        (opening a stream costs two multistream round trips), else a new one. Also says
        whether it was reused."""
        pool = self._pool.get(peer)
        now = trio.current_time()
        while pool:
            pooled = pool.pop()
            if now - pooled.idle_since < STREAM_IDLE_S and pooled.uses < STREAM_REUSES:
                return pooled, True
            await _close(pooled.stream)
        return _Pooled(await self._open(peer)), False

    def _checkin(self, peer: ID, pooled: _Pooled) -> bool:
        """Keep a stream whose last exchange completed cleanly for the next request."""
        pooled.uses += 1
        pooled.idle_since = trio.current_time()
        pool = self._pool.setdefault(peer, [])
        if len(pool) >= self.limits.max_tasks_per_peer + 1 or pooled.uses >= STREAM_REUSES:
            return False
        pool.append(pooled)
        return True

    async def _with_stream(self, peer: ID, use: Callable[[INetStream], Awaitable[_T]]) -> _T:
        """``use(stream)`` on a pooled or new stream; the stream goes back to the pool when
        ``use`` returns, and is closed when it raises or is cancelled. A stream that fails
        before an answer came (a pooled stream the executor closed meanwhile, a connection that
        broke) is replaced once by a new one and the request sent again: safe, as a RUN carries
        its task id; an executor never runs one twice, and answers a RUN it ran and awaits
        payment for with the same RESULT again."""
        for attempt in range(2):
            pooled, reused = await self._checkout(peer)
            try:
                result = await use(pooled.stream)
            except TaskFailed as exc:
                with trio.CancelScope(shield=True):
                    await _close(pooled.stream)
                if attempt == 0 and exc.code in ("protocol", "unreachable") and exc.stale:
                    continue
                raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    await _close(pooled.stream)
                raise
            if not self._checkin(peer, pooled):
                await _close(pooled.stream)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self, peer: ID) -> INetStream:
        """A new stream to ``peer``, dialling it first if needed. A connection that fails to
        open a stream (py-libp2p may keep one whose TCP socket was reset) is dropped and the
        peer dialled once more."""
        for attempt in range(2):
            if peer not in self.host.get_network().connections:
                await self.kad.find_peer(peer)
            try:
                return await self.host.new_stream(peer, [TASK])
            except Exception as exc:  # py-libp2p raises many types, some grouped
                if attempt:
                    raise TaskFailed("unreachable", f"cannot open {m.PROTOCOL_ID} to {peer}: {exc!r}") from None
                log.info("stream refused; dialling again", extra=kv(peer=str(peer), error=repr(exc)))
                with trio.move_on_after(2):
                    try:
                        await self.host.disconnect(peer)
                    except Exception as close_exc:  # already gone
                        log.debug("disconnect failed", extra=kv(peer=str(peer), error=repr(close_exc)))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(self, stream: INetStream, body: bytes) -> m.Reply:
        got = False
        try:
            await write_frame(stream, body)
            data = await read_frame(stream, m.MAX_REPLY)
            got = True
            reply = m.decode_reply(data)
        except (StreamEOF, FrameError, m.TaskMessageError, OSError) as exc:
            raise TaskFailed("protocol", f"{type(exc).__name__}: {exc}", stale=not got) from None
        except Exception as exc:  # stream reset and other libp2p I/O errors
            raise TaskFailed("unreachable", f"{type(exc).__name__}: {exc}", stale=not got) from None
        if isinstance(reply, m.ErrorReply):
            raise TaskFailed(reply.code, reply.message)
        return reply

    async def _request(self, peer: ID, body: bytes, seconds: float | None = None) -> m.Reply:
        try:
            with trio.fail_after(seconds or self.limits.request_timeout):
                return await self._with_stream(peer, lambda stream: self._exchange(stream, body))
        except trio.TooSlowError:
            raise TaskFailed("timeout", f"{peer} did not answer in time") from None
        except DiscoveryError as exc:
            raise TaskFailed("unreachable", str(exc)) from None

    async def list_models(self, peer: ID) -> tuple[list[m.CatalogueEntry], float]:
        """The models ``peer`` offers, and the round-trip time of asking, in ms."""
        started = trio.current_time()
        reply = await self._request(peer, m.encode_request(m.ListModels()))
        if not isinstance(reply, m.Catalogue):
            raise TaskFailed("protocol", "LIST answered with something else than a catalogue")
        return list(reply.entries), (trio.current_time() - started) * 1000

    async def run_remote(self, peer: ID, entry: m.CatalogueEntry, inputs: dict[str, Any],
                         max_amount: int) -> RemoteOutcome:
        """Run ``entry``'s model on ``peer`` for at most ``max_amount``; pays with signed receipts.
        The request waits for one of the ``max_tasks_per_peer`` slots of that peer, and goes out
        with the other requests for that model there that waited with it (a batch)."""
        self._outstanding[peer] += 1
        try:
            if self._nursery is None:  # not serving (a bare client): one task per request
                async with self._slots_of(peer):
                    return await self._run_remote(peer, entry, inputs, max_amount)
            item = _Item(inputs, m.pack_inputs(inputs), _reply_bytes(entry, inputs), max_amount)
            key = (peer, entry.model_id)
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane()
                self._nursery.start_soon(self._dispatch, peer, entry, key, lane)
            lane.queue.append(item)
            lane.wakeup.set()
            try:
                await item.done.wait()
            except trio.Cancelled:
                item.cancelled = True  # still queued: never sent; sent: its result is dropped
                raise
        finally:
            self._outstanding[peer] -= 1
            if self._outstanding[peer] <= 0:
                del self._outstanding[peer]
        if isinstance(item.outcome, TaskFailed):
            raise item.outcome
        assert item.outcome is not None
        return item.outcome

    async def _dispatch(self, peer: ID, entry: m.CatalogueEntry, key: tuple[ID, bytes], lane: _Lane) -> None:
        """Send ``lane``'s requests: whenever a slot of ``peer`` is free, everything queued
        meanwhile (within the batch limits) goes out as one task. Ends when the lane is empty
        and idle (a later request starts a new lane)."""
        slots = self._slots_of(peer)
        async with trio.open_nursery() as sending:
            while True:
                while not lane.queue:
                    if not lane.running:
                        del self._lanes[key]
                        return
                    lane.wakeup = trio.Event()
                    await lane.wakeup.wait()
                token = object()
                await slots.acquire_on_behalf_of(token)
                items = _take(lane)
                if not items:
                    slots.release_on_behalf_of(token)
                    continue
                lane.running += 1
                sending.start_soon(self._send, peer, entry, lane, items, token)

    async def _send(self, peer: ID, entry: m.CatalogueEntry, lane: _Lane, items: list[_Item], token: object) -> None:
        try:
            if len(items) == 1:
                items[0].outcome = await self._run_remote(peer, entry, items[0].inputs, items[0].max_amount)
            else:
                await self._run_batch(peer, entry, items)
        except TaskFailed as exc:
            for item in items:
                item.outcome = exc
        except Exception as exc:  # never let one batch take the service down
            log.warning("batch failed", extra=kv(peer=str(peer), error=repr(exc)))
            for item in items:
                item.outcome = TaskFailed("internal", f"{type(exc).__name__}: {exc}")
        finally:
            self._slots_of(peer).release_on_behalf_of(token)
            lane.running -= 1
            lane.wakeup.set()
            for item in items:
                if item.outcome is None:
                    item.outcome = TaskFailed("internal", "the batch was abandoned")
                item.done.set()

    async def _run_batch(self, peer: ID, entry: m.CatalogueEntry, items: list[_Item]) -> None:
        """One RUN_BATCH for ``items`` (one authorisation for their summed maximum), its charge
        checked and paid with one PAY; each item gets its output or its own error."""
        executor = account_of(peer)
        max_amount = sum(i.max_amount for i in items)
        auth = self._authorise(executor, entry.model_id, max_amount)
        started = trio.current_time()
        run = m.encode_run_batch(entry.model_id, [i.packed for i in items], auth)

        async def exchange(stream: INetStream) -> tuple[m.BatchResult, list[Receipt]]:
            reply = await self._watching(peer, self._exchange(stream, run))
            if not isinstance(reply, m.BatchResult) or reply.task_id != auth.task_id or len(reply.items) != len(items):
                raise TaskFailed("protocol", "RUN_BATCH answered with something else than its BATCH_RESULT")
            used = sum(units(r.usage) for r in reply.items if isinstance(r, m.ItemResult))
            self._check_charge(reply.charge, used, entry, executor, max_amount)
            return reply, await self._pay(stream, auth, executor, reply.charge)

        reply, receipts = await self._paid_exchange(peer, exchange)
        ms = (trio.current_time() - started) * 1000
        self.batches_sent += 1
        self.batched_requests += len(items)
        for item, r in zip(items, reply.items, strict=True):
            if isinstance(r, m.ItemError):
                item.outcome = TaskFailed(r.code, r.message)
                continue
            share = charge_for(units(r.usage), reply.charge.price_per_unit, item.max_amount, royalty=self.royalty,
                               payer=self.account, executor=executor, publisher=entry.publisher)
            item.outcome = RemoteOutcome(r.output, r.usage, share, tuple(receipts), ms, len(items))

    def _authorise(self, executor: bytes, model_id: bytes, max_amount: int) -> m.Authorisation:
        return sign_auth(self.key, m.Authorisation(
            payer=self.account, executor=executor, model_id=model_id, task_id=os.urandom(32),
            chain_id=self.chain_id, max_amount=max_amount, expiry=int(time.time()) + self.limits.auth_ttl))

    async def _pay(self, stream: INetStream, auth: m.Authorisation, executor: bytes, charge: Charge) -> list[Receipt]:
        """Sign the receipts of a checked charge and PAY them on ``stream``."""
        receipts = [
            sign_receipt(self.key.signing_key, receipt_id=r.receipt_id, payee=r.payee, amount=r.amount,
                         chain_id=r.chain_id)
            for r in expected_receipts(auth.task_id, self.account, executor, charge, self.chain_id)
        ]
        if receipts:
            paid = await self._exchange(stream, m.encode_request(m.Pay(auth.task_id, tuple(receipts))))
            if not isinstance(paid, m.Paid):
                raise TaskFailed("protocol", "PAY answered with something else than PAID")
        return receipts

    async def _paid_exchange(self, peer: ID, exchange: Callable[[INetStream], Awaitable[_T]]) -> _T:
        try:
            with trio.fail_after(self.limits.run_timeout + self.limits.request_timeout):
                return await self._with_stream(peer, exchange)
        except trio.TooSlowError:
            raise TaskFailed("timeout", f"{peer} did not finish the task in time") from None
        except DiscoveryError as exc:
            raise TaskFailed("unreachable", str(exc)) from None

    async def _run_remote(self, peer: ID, entry: m.CatalogueEntry, inputs: dict[str, Any],
                          max_amount: int) -> RemoteOutcome:
        executor = account_of(peer)
        auth = self._authorise(executor, entry.model_id, max_amount)
        started = trio.current_time()
        run = m.encode_request(m.Run(entry.model_id, inputs, auth))

        async def exchange(stream: INetStream) -> tuple[m.Result, list[Receipt]]:
            reply = await self._watching(peer, self._exchange(stream, run))
            if not isinstance(reply, m.Result) or reply.task_id != auth.task_id:
                raise TaskFailed("protocol", "RUN answered with something else than its RESULT")
            self._check_charge(reply.charge, units(reply.usage), entry, executor, max_amount)
            return reply, await self._pay(stream, auth, executor, reply.charge)

        reply, receipts = await self._paid_exchange(peer, exchange)
        ms = (trio.current_time() - started) * 1000
        return RemoteOutcome(reply.output, reply.usage, reply.charge, tuple(receipts), ms)

    async def _watching(self, peer: ID, work: Coroutine[Any, Any, m.Reply]) -> m.Reply:
        """Await ``work`` unless the connection to ``peer`` goes first: py-libp2p does not always
        fail a stream whose connection closed, and a dead executor must not hold the task."""
        result: list[m.Reply] = []
        failed: list[TaskFailed] = []  # raised after the nursery, not as an ExceptionGroup
        lost = False

        async def do() -> None:
            try:
                result.append(await work)
            except TaskFailed as exc:
                failed.append(exc)
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal lost
            failures = 0
            while failures < LIVENESS_FAILURES:  # py-libp2p has no per-peer disconnect event to wait on
                await trio.sleep(LIVENESS_INTERVAL)
                if peer not in self.host.get_network().connections:
                    break
                try:  # a connection can outlive its peer here: ask the peer itself
                    with trio.fail_after(LIVENESS_TIMEOUT):
                        await self._request(peer, m.encode_request(m.ListModels()), LIVENESS_TIMEOUT)
                    failures = 0
                except (TaskFailed, trio.TooSlowError):
                    failures += 1  # one slow answer from a busy executor is no proof of death
            lost = True
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(do)
            nursery.start_soon(watch)
        if failed:
            raise failed[0]
        if lost and not result:
            raise TaskFailed("unreachable", f"the connection to {peer} closed during the task", stale=True)
        return result[0]

    def _check_charge(self, c: Charge, used: int, entry: m.CatalogueEntry, executor: bytes, max_amount: int) -> None:
        """The payer signs only what the rules give: the quoted price (or less) × the usage's
        units, capped at the maximum, split with the royalty to the catalogue's publisher."""
        want = charge_for(used, c.price_per_unit, max_amount, royalty=self.royalty,
                          payer=self.account, executor=executor, publisher=entry.publisher)
        if c.price_per_unit > entry.price_per_unit:
            raise TaskFailed("bad_charge", f"price {c.price_per_unit} is above the quoted {entry.price_per_unit}")
        if c != want:
            raise TaskFailed("bad_charge", f"charge {c} does not follow from the usage (expected {want})")

    async def deliver(self, publisher: bytes, receipts: list[Receipt]) -> int:
        """Hand royalty receipts to the publisher's node (the Settler's forward loop)."""
        accepted = 0
        for i in range(0, len(receipts), m.MAX_RECEIPTS_PER_MESSAGE):
            part = tuple(receipts[i: i + m.MAX_RECEIPTS_PER_MESSAGE])
            reply = await self._request(peer_of(publisher), m.encode_request(m.Deliver(part)))
            if not isinstance(reply, m.Accepted):
                raise TaskFailed("protocol", "DELIVER answered with something else than ACCEPTED")
            accepted += reply.count
        return accepted


def _take(lane: _Lane) -> list[_Item]:
    """The queued requests that fit one RUN_BATCH, oldest first (at least one)."""
    items: list[_Item] = []
    size = reply = 0
    while lane.queue and len(items) < m.MAX_BATCH_ITEMS:
        item = lane.queue[0]
        if item.cancelled:
            lane.queue.popleft()
            continue
        if items and (size + len(item.packed) > BATCH_REQUEST_BYTES or reply + item.reply_bytes > BATCH_REPLY_BYTES):
            break
        items.append(lane.queue.popleft())
        size += len(item.packed)
        reply += item.reply_bytes
    return items


async def _close(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # the peer may be gone; nothing left to close
            pass

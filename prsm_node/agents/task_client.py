"""The client (payer) side of ``/prsm/task/1.0.0`` (protocols/task.md): ``list_models``,
``run_remote`` (RUN → check the charge → sign → PAY → PAID) and ``deliver`` (royalty receipts
from an executor to the publisher's node), plus what both sides share: the error a client sees,
the limits, and the receipts a charge is paid with.

A client runs at most ``max_tasks_per_peer`` tasks at once on one executor (the executor's own
admission limit): more wait here for a slot instead of being refused ``busy`` there, and
``outstanding(peer)`` tells the router how loaded each executor is from this node's side.
Streams are reused: a request goes on an idle stream to its peer when there is one (opening a
stream costs two multistream round trips and most of a small task's time).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
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
    output: Any
    usage: Usage
    charge: Charge
    receipts: tuple[Receipt, ...]
    ms: float


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

    def _init_client(self) -> None:
        self._slots: dict[ID, trio.CapacityLimiter] = {}
        self._waiting: dict[ID, int] = {}
        self._pool: dict[ID, list[_Pooled]] = {}  # idle streams per executor, most recent last

    def outstanding(self, peer: ID) -> int:
        """Tasks this node has running on ``peer`` or waiting for a slot there."""
        slots = self._slots.get(peer)
        return (slots.borrowed_tokens if slots is not None else 0) + self._waiting.get(peer, 0)

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
        Waits for one of the ``max_tasks_per_peer`` slots of that peer first."""
        slots = self._slots.setdefault(peer, trio.CapacityLimiter(self.limits.max_tasks_per_peer))
        self._waiting[peer] = self._waiting.get(peer, 0) + 1
        try:
            await slots.acquire()
        finally:
            self._waiting[peer] -= 1
        try:
            return await self._run_remote(peer, entry, inputs, max_amount)
        finally:
            slots.release()

    async def _run_remote(self, peer: ID, entry: m.CatalogueEntry, inputs: dict[str, Any],
                          max_amount: int) -> RemoteOutcome:
        executor = account_of(peer)
        auth = sign_auth(self.key, m.Authorisation(
            payer=self.account, executor=executor, model_id=entry.model_id, task_id=os.urandom(32),
            chain_id=self.chain_id, max_amount=max_amount, expiry=int(time.time()) + self.limits.auth_ttl))
        started = trio.current_time()
        run = m.encode_request(m.Run(entry.model_id, inputs, auth))

        async def exchange(stream: INetStream) -> tuple[m.Result, list[Receipt]]:
            reply = await self._watching(peer, self._exchange(stream, run))
            if not isinstance(reply, m.Result) or reply.task_id != auth.task_id:
                raise TaskFailed("protocol", "RUN answered with something else than its RESULT")
            self._check_charge(reply, entry, executor, max_amount)
            receipts = [
                sign_receipt(self.key.signing_key, receipt_id=r.receipt_id, payee=r.payee, amount=r.amount,
                             chain_id=r.chain_id)
                for r in expected_receipts(auth.task_id, self.account, executor, reply.charge, self.chain_id)
            ]
            if receipts:
                paid = await self._exchange(stream, m.encode_request(m.Pay(auth.task_id, tuple(receipts))))
                if not isinstance(paid, m.Paid):
                    raise TaskFailed("protocol", "PAY answered with something else than PAID")
            return reply, receipts

        try:
            with trio.fail_after(self.limits.run_timeout + self.limits.request_timeout):
                reply, receipts = await self._with_stream(peer, exchange)
        except trio.TooSlowError:
            raise TaskFailed("timeout", f"{peer} did not finish the task in time") from None
        except DiscoveryError as exc:
            raise TaskFailed("unreachable", str(exc)) from None
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

    def _check_charge(self, reply: m.Result, entry: m.CatalogueEntry, executor: bytes, max_amount: int) -> None:
        """The payer signs only what the rules give: the quoted price (or less) × the usage's
        units, capped at the maximum, split with the royalty to the catalogue's publisher."""
        c = reply.charge
        want = charge_for(units(reply.usage), c.price_per_unit, max_amount, royalty=self.royalty,
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



async def _close(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # the peer may be gone; nothing left to close
            pass

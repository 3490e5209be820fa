"""``/prsm/task/1.0.0``: run a hosted model for a peer that pays for it (protocols/task.md).

Server (executor): ``LIST`` answers the models this node can run (complete manifests in its
shard store whose metadata carries an ``architecture``), with price and load. ``RUN`` checks,
in order: the authorisation's shape and signature, chain, executor, expiry and replay; that
the model is hosted here and not halted; that the payer owes nothing here; admission (per-peer
concurrent tasks, total tasks); the payer's balance less what it already owes here covers the
maximum; the inputs fit the model; the maximum covers ``price × max_units``. Then it runs the
model, answers RESULT with the usage and the charge, and waits (``pay_timeout``) on the same
stream for PAY: the payer's signed receipt(s) for exactly that charge. Until they come, that
payer gets ``unpaid`` for any new task here (a later PAY on a new stream clears it).

Client (payer): ``list_models``, ``run_remote`` (RUN → check the charge → sign → PAY → PAID),
and ``deliver`` (royalty receipts from an executor to the publisher's node).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from .._trio import TaskStatus
from ..exceptions import DiscoveryError
from ..keys import NodeKey
from ..ledger.signing import _verify, sign_receipt, verify_receipt_signature
from ..ledger.types import Receipt
from ..logs import kv
from ..wire import FrameError, guarded_handler, read_frame, write_frame
from . import task_messages as m
from .exceptions import AgentError, InvalidInput, InvalidSpec, ModelNotLoaded, ModelUnloaded, RuntimeBusy
from .inputs import RunResult, Usage, parse_input
from .pricing import DEFAULT_PRICE_PER_UNIT, MAX_PRICE_PER_UNIT, Charge, charge_for, max_units, units
from .settlement import Settler
from .specs import ModelSpec, parse_spec

log = logging.getLogger(__name__)

TASK = TProtocol(m.PROTOCOL_ID)
LIVENESS_INTERVAL = 1.0  # while a remote task runs, its executor is probed this often
LIVENESS_TIMEOUT = 3.0


class TaskFailed(AgentError):
    """Raised to a client when a remote task did not produce a paid result: the peer answered
    an error (``code``), broke the protocol, or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TaskLimits:
    max_tasks_per_peer: int = 4
    max_tasks: int = 64
    pay_timeout: float = 10.0
    run_timeout: float = 120.0
    request_timeout: float = 10.0
    idle_timeout: float = 30.0
    auth_ttl: int = 300  # seconds an authorisation the client signs stays valid
    default_price_per_unit: int = DEFAULT_PRICE_PER_UNIT


@dataclass(frozen=True)
class Hosted:
    model_id: bytes
    name: str
    version: str
    tags: tuple[str, ...]
    publisher: bytes
    spec: ModelSpec
    architecture: dict[str, Any]
    files: tuple[str, ...]
    metadata_price: int | None


@dataclass(frozen=True)
class RemoteOutcome:
    output: Any
    usage: Usage
    charge: Charge
    receipts: tuple[Receipt, ...]
    ms: float


@dataclass
class _Owed:
    task_id: bytes
    payer: bytes
    charge: Charge
    chain_id: str
    paid: trio.Event = field(default_factory=trio.Event)


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def account_of(peer: ID) -> bytes:
    key = peer.extract_public_key()
    if key is None:
        raise TaskFailed("unreachable", f"peer id {peer} does not embed its public key")
    return bytes(key.to_bytes())


def peer_of(account: bytes) -> ID:
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(account))


def sign_auth(key: NodeKey, auth: m.Authorisation) -> m.Authorisation:
    from dataclasses import replace

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


def _metadata_price(metadata: dict[str, Any]) -> int | None:
    value = metadata.get("price_per_unit")
    if isinstance(value, str) and value.isdigit() and len(value) <= 30:
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_PRICE_PER_UNIT:
        return value
    return None


class TaskService:
    def __init__(self, host: IHost, kad: Any, key: NodeKey, chain_net: Any, shards: Any, runtime: Any,
                 settler_namespace: Any, *, chain_id: str, royalty: Fraction, fee: int = 0,
                 is_halted: Callable[[bytes], bool] | None = None, limits: TaskLimits | None = None,
                 settle_interval: float = 1.0) -> None:
        self.host = host
        self.kad = kad
        self.key = key
        self.account = key.account
        self.chain_net = chain_net
        self.shards = shards
        self.runtime = runtime
        self.chain_id = chain_id
        self.royalty = royalty
        self.is_halted: Callable[[bytes], bool] = is_halted or (lambda mid: False)
        self.limits = limits or TaskLimits()
        self.prices: dict[bytes, int] = {}  # per-model price overrides (smallest units per compute unit)
        self.settler = Settler(settler_namespace, chain_net, account=self.account, deliver=self.deliver,
                               interval=settle_interval, fee=fee)
        self._manifests: dict[bytes, Hosted | None] = {}
        self._load_locks: dict[bytes, trio.Lock] = {}
        self._per_peer: Counter[ID] = Counter()
        self._per_model: Counter[bytes] = Counter()
        self._active = 0
        self._owed: dict[bytes, _Owed] = {}  # task id -> awaiting PAY
        self._seen: dict[bytes, int] = {}  # task id -> expiry (replay protection)
        self.tasks_served = 0
        self.tasks_refused: Counter[str] = Counter()
        self.earned = 0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(TASK, guarded_handler(m.PROTOCOL_ID, self._handle))
        async with trio.open_nursery() as nursery:
            await nursery.start(self.settler.run)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------ hosted models

    def _hosted_sync(self) -> dict[bytes, Hosted]:
        store = self.shards.store
        out = {}
        for mid in store.manifest_ids():
            if mid not in self._manifests:
                try:
                    man = store.get_manifest(mid)
                    arch = man.metadata.get("architecture")
                    spec = parse_spec(arch)
                except (Exception, InvalidSpec):  # not a runnable model: never offered
                    self._manifests[mid] = None
                    continue
                if not store.is_complete(man):
                    continue  # still being fetched: asked again next time
                self._manifests[mid] = Hosted(mid, man.name, man.version, tuple(man.tags), man.publisher, spec,
                                              arch, tuple(f.path for f in man.files),
                                              _metadata_price(man.metadata))
            hosted = self._manifests.get(mid)
            if hosted is not None:
                out[mid] = hosted
        return out

    async def hosted(self) -> dict[bytes, Hosted]:
        return await trio.to_thread.run_sync(self._hosted_sync)

    def price_of(self, h: Hosted) -> int:
        if h.model_id in self.prices:
            return self.prices[h.model_id]
        return h.metadata_price if h.metadata_price is not None else self.limits.default_price_per_unit

    async def ensure_loaded(self, h: Hosted) -> str:
        """Load a hosted model into the runtime (assembling its files from the store first)."""
        rid = h.model_id.hex()
        lock = self._load_locks.setdefault(h.model_id, trio.Lock())
        async with lock:
            if any(info.model_id == rid for info in self.runtime.loaded()):
                return rid
            folder: Path = self.shards.models_dir / rid
            files = [folder / p for p in h.files]
            if not all(f.is_file() for f in files):
                man = await trio.to_thread.run_sync(self.shards.store.get_manifest, h.model_id)
                await trio.to_thread.run_sync(self.shards.store.assemble, man, folder)
            await self.runtime.load(rid, h.architecture, files)
        return rid

    async def run_local(self, h: Hosted, inputs: dict[str, Any]) -> RunResult:
        """Run a hosted model for this node itself (no payment)."""
        if self.is_halted(h.model_id):
            raise TaskFailed("halted", f"model {h.model_id.hex()} is halted")
        rid = await self.ensure_loaded(h)
        self._per_model[h.model_id] += 1
        try:
            result: RunResult
            try:
                result = await self.runtime.run(rid, inputs)
            except (ModelNotLoaded, ModelUnloaded):
                rid = await self.ensure_loaded(h)  # evicted between load and run: once more
                result = await self.runtime.run(rid, inputs)
            return result
        finally:
            self._per_model[h.model_id] -= 1

    # ------------------------------------------------------------ serving

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        for _ in range(64):
            try:
                with trio.fail_after(self.limits.idle_timeout):
                    body = await read_frame(stream, m.MAX_REQUEST)
            except StreamEOF:
                return
            except FrameError as exc:
                code = "too_large" if "exceeds the limit" in str(exc) else "malformed"
                self.tasks_refused[code] += 1
                await write_frame(stream, m.encode_error(code, str(exc)))
                return
            try:
                request = m.decode_request(body)
            except m.TaskMessageError as exc:
                self.tasks_refused["malformed"] += 1
                log.info("malformed task request", extra=kv(peer=str(peer), error=str(exc)))
                await write_frame(stream, m.encode_error("malformed", str(exc)))
                return
            if isinstance(request, m.ListModels):
                await write_frame(stream, m.encode_reply(await self._catalogue()))
            elif isinstance(request, m.Run):
                await self._serve_run(stream, peer, request)
            elif isinstance(request, m.Pay):
                await write_frame(stream, self._answer_pay(request))
            else:
                await write_frame(stream, await self._answer_deliver(request))

    async def _catalogue(self) -> m.Catalogue:
        entries = []
        for mid, h in sorted((await self.hosted()).items()):
            if self.is_halted(mid):
                continue
            entries.append(m.CatalogueEntry(mid, h.name[:128], h.version[:64], h.tags[:32], h.publisher,
                                            self.price_of(h), self._per_model[mid], h.architecture))
        return m.Catalogue(tuple(entries[: m.MAX_CATALOGUE]))

    def _check_run(self, peer: ID, req: m.Run, hosted: dict[bytes, Hosted]) -> tuple[Hosted, Any, int]:
        a = req.auth
        if not _verify(a.payer, a.signing_payload(), a.signature):
            raise _Refused("bad_signature", "the authorisation is not signed by its payer")
        if a.chain_id != self.chain_id:
            raise _Refused("wrong_chain", f"authorised for chain {a.chain_id!r}, this node is on {self.chain_id!r}")
        if a.executor != self.account:
            raise _Refused("wrong_executor", f"authorised for executor {a.executor.hex()}, not this node")
        now = int(time.time())
        if a.expiry <= now:
            raise _Refused("expired", f"the authorisation expired at {a.expiry} (now {now})")
        self._seen = {t: e for t, e in self._seen.items() if e > now}
        if a.task_id in self._seen or a.task_id in self._owed:
            raise _Refused("replayed", f"task id {a.task_id.hex()} was used before")
        h = hosted.get(req.model_id)
        if h is None:
            raise _Refused("not_hosted", f"model {req.model_id.hex()} is not hosted here")
        if self.is_halted(req.model_id):
            raise _Refused("halted", f"model {req.model_id.hex()} is halted by the circuit breaker")
        owing = [o.task_id.hex() for o in self._owed.values() if o.payer == a.payer]
        if owing:
            raise _Refused("unpaid", f"payer owes the receipt of task {owing[0]}")
        if self._per_peer[peer] >= self.limits.max_tasks_per_peer:
            raise _Refused("busy", f"{self.limits.max_tasks_per_peer} tasks of this peer are running")
        if self._active >= self.limits.max_tasks:
            raise _Refused("busy", f"{self.limits.max_tasks} tasks are running")
        available = self.chain_net.chain.state.account(a.payer).balance - self.settler.owed_by(a.payer)
        if available < a.max_amount:
            raise _Refused("insufficient_funds",
                           f"payer balance less unsettled receipts is {max(available, 0)}, below {a.max_amount}")
        try:
            parsed = parse_input(h.spec, req.inputs)
        except InvalidInput as exc:
            raise _Refused("invalid_input", str(exc)) from None
        price = self.price_of(h)
        need = max_units(h.spec, parsed) * price
        if need > a.max_amount:
            raise _Refused("price_too_low",
                           f"up to {need} for this request at {price} per unit; {a.max_amount} offered")
        return h, parsed, price

    async def _serve_run(self, stream: INetStream, peer: ID, req: m.Run) -> None:
        a = req.auth
        try:
            h, _, price = self._check_run(peer, req, await self.hosted())
        except _Refused as exc:
            self.tasks_refused[exc.code] += 1
            await write_frame(stream, m.encode_error(exc.code, exc.message))
            return
        self._seen[a.task_id] = a.expiry
        self._per_peer[peer] += 1
        self._active += 1
        try:
            with trio.fail_after(self.limits.run_timeout):
                result = await self.run_local(h, req.inputs)
        except (RuntimeBusy, TaskFailed) as exc:
            code = "busy" if isinstance(exc, RuntimeBusy) else "halted"
            await write_frame(stream, m.encode_error(code, str(exc)))
            return
        except (AgentError, trio.TooSlowError) as exc:
            log.warning("task failed", extra=kv(model=h.model_id.hex()[:16], error=repr(exc)))
            await write_frame(stream, m.encode_error("inference_failed", str(exc) or "timed out"))
            return
        finally:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]
            self._active -= 1
        charge = charge_for(units(result.usage), price, a.max_amount, royalty=self.royalty, payer=a.payer,
                            executor=self.account, publisher=h.publisher)
        self.tasks_served += 1
        owed = _Owed(a.task_id, a.payer, charge, a.chain_id)
        if charge.amount:
            self._owed[a.task_id] = owed
        await write_frame(stream, m.encode_reply(m.Result(a.task_id, result.output, result.usage, charge)))
        if not charge.amount:
            return
        try:
            with trio.fail_after(self.limits.pay_timeout):
                body = await read_frame(stream, m.MAX_REQUEST)
        except (StreamEOF, FrameError, trio.TooSlowError):
            log.info("no receipt for a task", extra=kv(task=a.task_id.hex()[:16], payer=a.payer.hex()[:16]))
            return  # the payer stays marked as owing
        try:
            pay = m.decode_request(body)
        except m.TaskMessageError as exc:
            await write_frame(stream, m.encode_error("malformed", str(exc)))
            return
        if not isinstance(pay, m.Pay):
            await write_frame(stream, m.encode_error("malformed", "expected PAY after RESULT"))
            return
        await write_frame(stream, self._answer_pay(pay))

    def _answer_pay(self, pay: m.Pay) -> bytes:
        owed = self._owed.get(pay.task_id)
        if owed is None:
            return m.encode_error("unknown_task", f"no unpaid task {pay.task_id.hex()} here")
        want = expected_receipts(owed.task_id, owed.payer, self.account, owed.charge, owed.chain_id)
        got = list(pay.receipts)
        if [(r.receipt_id, r.payer, r.payee, r.amount, r.chain_id) for r in got] != [
            (r.receipt_id, r.payer, r.payee, r.amount, r.chain_id) for r in want
        ]:
            return m.encode_error("bad_receipt", "the receipts do not match the charge of the task")
        if not all(verify_receipt_signature(r) for r in got):
            return m.encode_error("bad_signature", "a receipt is not signed by the payer")
        self.settler.add(got)
        self.earned += owed.charge.executor_amount
        del self._owed[pay.task_id]
        owed.paid.set()
        return m.encode_reply(m.Paid(pay.task_id))

    async def _answer_deliver(self, msg: m.Deliver) -> bytes:
        state = self.chain_net.chain.state
        for r in msg.receipts:
            if r.payee != self.account:
                return m.encode_error("bad_receipt", f"receipt {r.receipt_id.hex()} does not pay this node")
            if r.chain_id != self.chain_id:
                return m.encode_error("wrong_chain", f"receipt {r.receipt_id.hex()} is for chain {r.chain_id!r}")
            if r.amount <= 0:
                return m.encode_error("bad_receipt", f"receipt {r.receipt_id.hex()} has no amount")
            if not verify_receipt_signature(r):
                return m.encode_error("bad_signature", f"receipt {r.receipt_id.hex()} is not signed by its payer")
        fresh = [r for r in msg.receipts if not state.is_settled(r.payer, r.receipt_id)]
        self.settler.add(fresh)
        return m.encode_reply(m.Accepted(len(msg.receipts)))

    # ------------------------------------------------------------ client

    async def _open(self, peer: ID) -> INetStream:
        if peer not in self.host.get_network().connections:
            await self.kad.find_peer(peer)
        try:
            return await self.host.new_stream(peer, [TASK])
        except Exception as exc:  # py-libp2p raises many types, some grouped
            raise TaskFailed("unreachable", f"cannot open {m.PROTOCOL_ID} to {peer}: {exc!r}") from None

    async def _exchange(self, stream: INetStream, body: bytes) -> m.Reply:
        try:
            await write_frame(stream, body)
            reply = m.decode_reply(await read_frame(stream, m.MAX_REPLY))
        except (StreamEOF, FrameError, m.TaskMessageError, OSError) as exc:
            raise TaskFailed("protocol", f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # stream reset and other libp2p I/O errors
            raise TaskFailed("unreachable", f"{type(exc).__name__}: {exc}") from None
        if isinstance(reply, m.ErrorReply):
            raise TaskFailed(reply.code, reply.message)
        return reply

    async def _request(self, peer: ID, body: bytes, seconds: float | None = None) -> m.Reply:
        try:
            with trio.fail_after(seconds or self.limits.request_timeout):
                stream = await self._open(peer)
                try:
                    return await self._exchange(stream, body)
                finally:
                    await _close(stream)
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
        """Run ``entry``'s model on ``peer`` for at most ``max_amount``; pays with signed receipts."""
        executor = account_of(peer)
        auth = sign_auth(self.key, m.Authorisation(
            payer=self.account, executor=executor, model_id=entry.model_id, task_id=os.urandom(32),
            chain_id=self.chain_id, max_amount=max_amount, expiry=int(time.time()) + self.limits.auth_ttl))
        started = trio.current_time()
        try:
            with trio.fail_after(self.limits.run_timeout + self.limits.request_timeout):
                stream = await self._open(peer)
                try:
                    reply = await self._watching(peer, self._exchange(
                        stream, m.encode_request(m.Run(entry.model_id, inputs, auth))))
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
                finally:
                    await _close(stream)
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
        lost = False

        async def do() -> None:
            result.append(await work)
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal lost
            while True:  # py-libp2p has no per-peer disconnect event to wait on
                await trio.sleep(LIVENESS_INTERVAL)
                if peer not in self.host.get_network().connections:
                    break
                try:  # a connection can outlive its peer here: ask the peer itself
                    with trio.fail_after(LIVENESS_TIMEOUT):
                        await self._request(peer, m.encode_request(m.ListModels()), LIVENESS_TIMEOUT)
                except (TaskFailed, trio.TooSlowError):
                    break
            lost = True
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(do)
            nursery.start_soon(watch)
        if lost and not result:
            raise TaskFailed("unreachable", f"the connection to {peer} closed during the task")
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

    def statistics(self) -> dict[str, Any]:
        return {
            "tasks_served": self.tasks_served,
            "tasks_running": self._active,
            "tasks_refused": dict(self.tasks_refused),
            "unpaid_tasks": len(self._owed),
            "earned": self.earned,
            **self.settler.statistics(),
        }


async def _close(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # the peer may be gone; nothing left to close
            pass

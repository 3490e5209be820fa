"""``/prsm/task/1.0.0``: run a hosted model for a peer that pays for it (protocols/task.md).

Server (executor): ``LIST`` answers the models this node can run (complete manifests in its
shard store whose metadata carries an ``architecture``), with price and load. ``RUN`` checks,
in order: the authorisation's shape and signature, chain, executor, expiry and replay; that
the model is hosted here and not halted; that the payer has not defaulted here; admission
(per-peer concurrent tasks, total tasks); the payer's balance less what it already owes here
covers the maximum; the inputs fit the model; the maximum covers ``price × max_units``. Then it
runs the model, answers RESULT with the usage and the charge, and waits (``pay_timeout``) on
the same stream for PAY: the payer's signed receipt(s) for exactly that charge. A payer whose
PAY did not come in time, or was wrong, gets ``unpaid`` for any new task here until a later
PAY on a new stream clears it.

When the circuit breaker halts a model, ``halt()`` cancels every execution of it on this node
(remote tasks answer ``halted``, local runs raise ``TaskFailed("halted")``) and unloads it.

The client (payer) half is ``task_client.TaskClient``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from .._trio import TaskStatus
from ..keys import NodeKey
from ..ledger.signing import _verify, verify_receipt_signature
from ..logs import kv
from ..wire import FrameError, guarded_handler, read_frame, write_frame
from . import task_messages as m
from .exceptions import AgentError, InvalidInput, InvalidSpec, ModelNotLoaded, ModelUnloaded, RuntimeBusy
from .inputs import ModelInput, RunResult, parse_input
from .pricing import MAX_PRICE_PER_UNIT, Charge, charge_for, max_units, units
from .settlement import Settler
from .specs import ModelSpec, parse_spec
from .task_client import (
    LIVENESS_INTERVAL,
    LIVENESS_TIMEOUT,
    TASK,
    RemoteOutcome,
    TaskClient,
    TaskFailed,
    TaskLimits,
    account_of,
    expected_receipts,
    peer_of,
    sign_auth,
)

__all__ = ["LIVENESS_INTERVAL", "LIVENESS_TIMEOUT", "TASK", "Hosted", "RemoteOutcome", "TaskFailed", "TaskLimits",
           "TaskService", "account_of", "expected_receipts", "peer_of", "sign_auth"]

log = logging.getLogger(__name__)

HOSTED_MAX_AGE = 1.0  # seconds a RUN may rely on the last scan of the hosted models


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


@dataclass
class _Owed:
    task_id: bytes
    payer: bytes
    charge: Charge
    chain_id: str
    deadline: float  # trio clock: PAY is due by then
    auth: m.Authorisation | None = None  # a repeated RUN with this very authorisation gets the RESULT again
    result: bytes = b""  # the encoded RESULT
    attempt: int = 0  # deliveries of the RESULT so far
    defaulted: bool = False  # PAY did not come in time, or was wrong
    paid: trio.Event = field(default_factory=trio.Event)

    def overdue(self, now: float) -> bool:
        return self.defaulted or now > self.deadline


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _metadata_price(metadata: dict[str, Any]) -> int | None:
    value = metadata.get("price_per_unit")
    if isinstance(value, str) and value.isdigit() and len(value) <= 30:
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_PRICE_PER_UNIT:
        return value
    return None


class TaskService(TaskClient):
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
        self._hosted_at: tuple[float, dict[bytes, Hosted]] | None = None
        self._running: dict[bytes, set[trio.CancelScope]] = {}  # model id -> its executions here
        self._nursery: trio.Nursery | None = None
        self.tasks_served = 0
        self.tasks_refused: Counter[str] = Counter()
        self.tasks_halted = 0
        self.earned = 0
        self.written_off = 0
        self.redelivered = 0
        self._changed = trio.Event()
        self._init_client()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(TASK, guarded_handler(m.PROTOCOL_ID, self._handle))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.settler.run)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------ circuit breaker

    def halt(self, model_id: bytes) -> int:
        """The breaker halted ``model_id``: cancel its executions here and unload it. Returns
        how many executions were cancelled."""
        scopes = self._running.get(model_id, set())
        for scope in scopes:
            scope.cancel()
        if scopes:
            log.warning("halted model's tasks cancelled", extra=kv(model=model_id.hex()[:16], tasks=len(scopes)))
        if self._nursery is not None:
            self._nursery.start_soon(self._unload, model_id)
        return len(scopes)

    async def _unload(self, model_id: bytes) -> None:
        try:
            await self.runtime.unload(model_id.hex())
        except ModelNotLoaded:
            pass

    @contextmanager
    def _guard(self, model_id: bytes) -> Iterator[None]:
        """Run the block as an execution of ``model_id`` that a halt cancels; raises
        TaskFailed("halted") when the model is halted before or during it."""
        if self.is_halted(model_id):
            raise TaskFailed("halted", f"model {model_id.hex()} is halted by the circuit breaker")
        scope = trio.CancelScope()
        running = self._running.setdefault(model_id, set())
        running.add(scope)
        self._poke()
        try:
            with scope:
                yield
        finally:
            running.discard(scope)
            if not running:
                del self._running[model_id]
            self._poke()
        if scope.cancelled_caught:
            self.tasks_halted += 1
            if self._nursery is not None:  # a load the halt could not interrupt may have finished since
                self._nursery.start_soon(self._unload, model_id)
            raise TaskFailed("halted", f"model {model_id.hex()} was halted by the circuit breaker while running")

    def running(self, model_id: bytes) -> int:
        """Executions of ``model_id`` in progress on this node (remote tasks and local runs)."""
        return len(self._running.get(model_id, ()))

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds; re-checked whenever an execution starts or ends."""
        while not condition():
            await self._changed.wait()

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
        hosted = await trio.to_thread.run_sync(self._hosted_sync)
        self._hosted_at = (trio.current_time(), hosted)
        return hosted

    async def _hosted_for(self, model_id: bytes) -> dict[bytes, Hosted]:
        """``hosted()``, or its last answer when that is recent and holds ``model_id``: a RUN
        for a model served a moment ago needs no store scan (and no thread hop)."""
        if self._hosted_at is not None:
            when, hosted = self._hosted_at
            if model_id in hosted and trio.current_time() - when < HOSTED_MAX_AGE:
                return hosted
        return await self.hosted()

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

    async def run_local(self, h: Hosted, inputs: object) -> RunResult:
        """Run a hosted model (for this node itself, or for a task). Raises TaskFailed("halted")
        when the model is or becomes halted; a halt cancels the run at once."""
        result: RunResult | None = None
        with self._guard(h.model_id):
            rid = await self.ensure_loaded(h)
            self._per_model[h.model_id] += 1
            try:
                try:
                    result = await self.runtime.run(rid, inputs)
                except (ModelNotLoaded, ModelUnloaded):
                    if self.is_halted(h.model_id):
                        raise TaskFailed("halted", f"model {h.model_id.hex()} is halted") from None
                    rid = await self.ensure_loaded(h)  # evicted between load and run: once more
                    result = await self.runtime.run(rid, inputs)
            finally:
                self._per_model[h.model_id] -= 1
        assert result is not None
        return result

    async def run_local_many(self, h: Hosted, inputs: list[ModelInput]) -> list[RunResult | Exception]:
        """``run_local`` for several inputs at once, batched together by the runtime; an item
        whose forward pass failed gets its error (InferenceFailed), the others their result."""
        results: list[RunResult | Exception] = []
        with self._guard(h.model_id):
            rid = await self.ensure_loaded(h)
            self._per_model[h.model_id] += len(inputs)
            try:
                try:
                    results = await self.runtime.run_many(rid, inputs)
                except (ModelNotLoaded, ModelUnloaded):
                    if self.is_halted(h.model_id):
                        raise TaskFailed("halted", f"model {h.model_id.hex()} is halted") from None
                    rid = await self.ensure_loaded(h)
                    results = await self.runtime.run_many(rid, inputs)
            finally:
                self._per_model[h.model_id] -= len(inputs)
        return results

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
            elif isinstance(request, m.Run | m.RunBatch):
                await self._serve_run(stream, peer, request)
            elif isinstance(request, m.Pay):
                await write_frame(stream, await self._answer_pay(request))
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

    def _check_auth(self, peer: ID, model_id: bytes, a: m.Authorisation, hosted: dict[bytes, Hosted]) -> Hosted:
        """Rules 2 to 6 of a RUN or RUN_BATCH: the authorisation, the model, the payer's
        standing, admission and funds."""
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
        h = hosted.get(model_id)
        if h is None:
            raise _Refused("not_hosted", f"model {model_id.hex()} is not hosted here")
        if self.is_halted(model_id):
            raise _Refused("halted", f"model {model_id.hex()} is halted by the circuit breaker")
        now_t = trio.current_time()
        self._write_off(now_t)
        owing = [o for o in self._owed.values() if o.payer == a.payer]
        overdue = [o.task_id.hex() for o in owing if o.overdue(now_t)]
        if overdue:
            raise _Refused("unpaid", f"payer owes the receipt of task {overdue[0]}")
        if self._per_peer[peer] >= self.limits.max_tasks_per_peer:
            raise _Refused("busy", f"{self.limits.max_tasks_per_peer} tasks of this peer are running")
        if self._active >= self.limits.max_tasks:
            raise _Refused("busy", f"{self.limits.max_tasks} tasks are running")
        pending = sum(o.charge.amount for o in owing)  # results delivered, PAY not yet received
        available = self.chain_net.chain.state.account(a.payer).balance - self.settler.owed_by(a.payer) - pending
        if available < a.max_amount:
            raise _Refused("insufficient_funds",
                           f"payer balance less unsettled receipts is {max(available, 0)}, below {a.max_amount}")
        return h

    def _check_run(self, peer: ID, req: m.Run, hosted: dict[bytes, Hosted]) -> tuple[Hosted, Any, int]:
        h = self._check_auth(peer, req.model_id, req.auth, hosted)
        try:
            parsed = parse_input(h.spec, req.inputs)
        except InvalidInput as exc:
            raise _Refused("invalid_input", str(exc)) from None
        price = self.price_of(h)
        self._check_price(h, [parsed], price, req.auth.max_amount)
        return h, parsed, price

    def _check_batch(self, peer: ID, req: m.RunBatch,
                     hosted: dict[bytes, Hosted]) -> tuple[Hosted, list[ModelInput | m.ItemError], int]:
        """A RUN_BATCH's rules: those of the authorisation for the whole batch, then each input
        on its own (one that does not fit the model is that item's ``invalid_input``; the
        others run), then the price of the inputs that fit against the batch's maximum."""
        h = self._check_auth(peer, req.model_id, req.auth, hosted)
        items: list[ModelInput | m.ItemError] = []
        for raw in req.inputs:
            try:
                items.append(parse_input(h.spec, raw))
            except InvalidInput as exc:
                items.append(m.ItemError("invalid_input", str(exc)))
        price = self.price_of(h)
        self._check_price(h, [i for i in items if not isinstance(i, m.ItemError)], price, req.auth.max_amount)
        return h, items, price

    @staticmethod
    def _check_price(h: Hosted, inputs: list[ModelInput], price: int, offered: int) -> None:
        need = sum(max_units(h.spec, i) for i in inputs) * price
        if need > offered:
            raise _Refused("price_too_low", f"up to {need} for this request at {price} per unit; {offered} offered")

    async def _serve_run(self, stream: INetStream, peer: ID, req: m.Run | m.RunBatch) -> None:
        a = req.auth
        if await self._redeliver(stream, req):
            return
        try:
            hosted = await self._hosted_for(req.model_id)
            if isinstance(req, m.Run):
                h, parsed, price = self._check_run(peer, req, hosted)
                items: list[ModelInput | m.ItemError] = [parsed]
            else:
                h, items, price = self._check_batch(peer, req, hosted)
        except _Refused as exc:
            self.tasks_refused[exc.code] += 1
            await write_frame(stream, m.encode_error(exc.code, exc.message))
            return
        self._seen[a.task_id] = a.expiry
        self._per_peer[peer] += 1
        self._active += 1
        try:
            with trio.fail_after(self.limits.run_timeout):
                runnable = [i for i in items if not isinstance(i, m.ItemError)]
                if isinstance(req, m.Run):
                    ran: Iterator[RunResult | Exception] = iter([await self.run_local(h, runnable[0])])
                else:
                    ran = iter(await self.run_local_many(h, runnable) if runnable else [])
        except (RuntimeBusy, TaskFailed) as exc:
            code, message = ("busy", str(exc)) if isinstance(exc, RuntimeBusy) else (exc.code, exc.message)
            self.tasks_refused[code] += 1
            await write_frame(stream, m.encode_error(code, message))
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
        outcomes: list[m.ItemResult | m.ItemError] = []
        for item in items:
            if isinstance(item, m.ItemError):
                outcomes.append(item)
                continue
            result = next(ran)
            outcomes.append(m.ItemResult(result.output, result.usage) if isinstance(result, RunResult)
                            else m.ItemError("inference_failed", str(result)))
        used = sum(units(o.usage) for o in outcomes if isinstance(o, m.ItemResult))
        charge = charge_for(used, price, a.max_amount, royalty=self.royalty, payer=a.payer,
                            executor=self.account, publisher=h.publisher)
        if isinstance(req, m.Run):
            first = outcomes[0]
            if isinstance(first, m.ItemError):
                await write_frame(stream, m.encode_error(first.code, first.message))
                return
            reply = m.encode_reply(m.Result(a.task_id, first.output, first.usage, charge))
        else:
            reply = m.encode_reply(m.BatchResult(a.task_id, tuple(outcomes), charge))
        self.tasks_served += sum(isinstance(o, m.ItemResult) for o in outcomes)
        if not charge.amount:
            await write_frame(stream, reply)
            return
        owed = _Owed(a.task_id, a.payer, charge, a.chain_id, 0.0, auth=a, result=reply)
        self._owed[a.task_id] = owed
        await self._deliver(stream, owed)

    async def _redeliver(self, stream: INetStream, req: m.Run | m.RunBatch) -> bool:
        """A RUN repeated by its payer (same task, same signed authorisation) for a task that
        ran here and awaits PAY: its client lost the RESULT (a connection broke), so send it
        again rather than refuse the task as replayed or run it twice."""
        owed = self._owed.get(req.auth.task_id)
        if owed is None or owed.auth != req.auth or owed.auth.model_id != req.model_id:
            return False
        self.redelivered += 1
        await self._deliver(stream, owed)
        return True

    async def _deliver(self, stream: INetStream, owed: _Owed) -> None:
        """Send a task's RESULT and collect its PAY on the same stream (``pay_timeout``)."""
        owed.attempt += 1
        attempt = owed.attempt
        owed.deadline = trio.current_time() + self.limits.pay_timeout
        owed.defaulted = False

        def default() -> None:
            if owed.attempt == attempt:  # a later redelivery owns the task now
                owed.defaulted = True

        await write_frame(stream, owed.result)
        try:
            with trio.fail_after(self.limits.pay_timeout):
                body = await read_frame(stream, m.MAX_REQUEST)
        except (StreamEOF, FrameError, trio.TooSlowError):
            log.info("no receipt for a task", extra=kv(task=owed.task_id.hex()[:16], payer=owed.payer.hex()[:16]))
            default()  # the payer stays marked as owing
            return
        try:
            pay = m.decode_request(body)
        except m.TaskMessageError as exc:
            default()
            await write_frame(stream, m.encode_error("malformed", str(exc)))
            return
        if not isinstance(pay, m.Pay):
            default()
            await write_frame(stream, m.encode_error("malformed", "expected PAY after RESULT"))
            return
        answer = await self._answer_pay(pay)
        if owed.task_id in self._owed:
            default()
        await write_frame(stream, answer)

    def _write_off(self, now: float) -> None:
        """Forget unpaid tasks ``default_hold`` seconds after their PAY was due: the payer may
        simply have lost the result (a connection that broke after RESULT was sent), and must
        not be refused here forever for it. The loss is bounded: one task's charge per payer
        per ``default_hold``, within the balance that covered it."""
        expired = [t for t, o in self._owed.items() if now > o.deadline + self.limits.default_hold]
        for task_id in expired:
            owed = self._owed.pop(task_id)
            self.written_off += owed.charge.amount
            log.info("unpaid task written off", extra=kv(task=task_id.hex()[:16], payer=owed.payer.hex()[:16],
                                                         amount=owed.charge.amount))

    async def _answer_pay(self, pay: m.Pay) -> bytes:
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
        del self._owed[pay.task_id]  # before the write: a second PAY for it is unknown_task
        await self.settler.add(got)
        self.earned += owed.charge.executor_amount
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
        await self.settler.add(fresh)
        return m.encode_reply(m.Accepted(len(msg.receipts)))

    def statistics(self) -> dict[str, Any]:
        return {
            "tasks_served": self.tasks_served,
            "tasks_running": self._active,
            "tasks_refused": dict(self.tasks_refused),
            "unpaid_tasks": len(self._owed),
            "written_off": self.written_off,
            "results_redelivered": self.redelivered,
            "tasks_halted": self.tasks_halted,
            "earned": self.earned,
            "batches_sent": self.batches_sent,
            "batched_requests": self.batched_requests,
            **self.settler.statistics(),
        }

"""Messages of ``/prsm/task/1.0.0`` (protocols/task.md).

Each frame (prsm_node.wire framing) is one msgpack array whose first element is its type.

Requests: ``[LIST]``, ``[RUN, model_id, inputs, auth]``, ``[PAY, task_id, receipts]``,
``[DELIVER, receipts]``, ``[RUN_BATCH, model_id, [inputs, ...], auth]``. Replies: ``[CATALOGUE,
entries]``, ``[RESULT, task_id, output, usage, charge]``, ``[PAID, task_id]``, ``[ACCEPTED,
count]``, ``[BATCH_RESULT, task_id, [item, ...], charge]`` (an item is ``[0, output, usage]`` or
``[1, code, message]``) or ``[ERROR, code, message]``.

Amounts are 16-byte big-endian unsigned integers (as in the ledger codec); receipts are the
ledger's signed receipt encoding. Decoding is strict: a wrong shape is a ``TaskMessageError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from ..ledger.codec import decode_receipt, encode_receipt
from ..ledger.exceptions import LedgerDecodeError
from ..ledger.types import MAX_AMOUNT, Receipt
from ..strict_msgpack import unpack_strict
from .inputs import Usage
from .pricing import Charge

PROTOCOL_ID = "/prsm/task/1.0.0"
AUTH_DOMAIN = "prsm-task-auth-v1"
RECEIPT_ID_DOMAIN = b"prsm-task-receipt-v1"

# request types
LIST = 1
RUN = 2
PAY = 3
DELIVER = 4
RUN_BATCH = 5
# reply types
ERROR = 0
CATALOGUE = 10
RESULT = 11
PAID = 12
ACCEPTED = 13
BATCH_RESULT = 14
# batch item status
ITEM_OK = 0
ITEM_ERROR = 1

MAX_REQUEST = 256 * 1024  # a RUN with 64 texts of a few KiB each
MAX_REPLY = 1024 * 1024  # 64 embedding vectors of up to 2048 floats
MAX_CATALOGUE = 64
MAX_RECEIPTS_PER_MESSAGE = 64
MAX_BATCH_ITEMS = 64  # inputs in one RUN_BATCH (each within the runtime's own input limits)
MAX_ERROR_MESSAGE = 512
ID_SIZE = 32
AMOUNT_SIZE = 16
MAX_DEVICE_LEN = 16

ERROR_CODES = (
    "malformed",  # not a message of this protocol, or a field of the wrong shape
    "too_large",  # the frame is over the size limit
    "bad_signature",  # the authorisation or a receipt does not verify
    "wrong_chain",  # signed for another chain id
    "wrong_executor",  # the authorisation names another executor
    "expired",  # the authorisation's expiry has passed
    "replayed",  # this task id was used before
    "insufficient_funds",  # the payer's balance (less what it owes here) is below the maximum
    "price_too_low",  # the maximum does not cover this executor's price for the request's max units
    "not_hosted",  # this node does not hold the model
    "halted",  # the circuit breaker halted the model
    "busy",  # admission control: too many tasks from this peer, or the queue is full
    "unpaid",  # the payer owes a receipt for an earlier task here
    "invalid_input",  # the inputs do not fit the model's family
    "inference_failed",  # the model failed while running
    "bad_receipt",  # a PAY or DELIVER receipt is not the one expected
    "unknown_task",  # a PAY for a task this node is not waiting on
    "internal",  # this node's fault
)


class TaskMessageError(Exception):
    """Raised when a frame is not a well-formed message of ``/prsm/task/1.0.0``."""


@dataclass(frozen=True)
class Authorisation:
    """The payer's signed promise to pay up to ``max_amount`` for task ``task_id`` of
    ``model_id`` run by ``executor``, valid until ``expiry`` (unix seconds)."""

    payer: bytes
    executor: bytes
    model_id: bytes
    task_id: bytes
    chain_id: str
    max_amount: int
    expiry: int
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        return _pack([AUTH_DOMAIN, self.chain_id, self.payer, self.executor, self.model_id, self.task_id,
                      _amount(self.max_amount), self.expiry])


@dataclass(frozen=True)
class ListModels:
    pass


@dataclass(frozen=True)
class Run:
    model_id: bytes
    inputs: dict[str, Any]
    auth: Authorisation


@dataclass(frozen=True)
class RunBatch:
    """Several inputs for one model, run as one task: one authorisation covers them all
    (``max_amount`` bounds the whole batch), one charge, one PAY."""

    model_id: bytes
    inputs: tuple[dict[str, Any], ...]
    auth: Authorisation


@dataclass(frozen=True)
class Pay:
    task_id: bytes
    receipts: tuple[Receipt, ...]


@dataclass(frozen=True)
class Deliver:
    receipts: tuple[Receipt, ...]


@dataclass(frozen=True)
class CatalogueEntry:
    model_id: bytes
    name: str
    version: str
    tags: tuple[str, ...]
    publisher: bytes
    price_per_unit: int
    load: int  # tasks queued or running here for this model
    architecture: dict[str, Any]


@dataclass(frozen=True)
class Catalogue:
    entries: tuple[CatalogueEntry, ...]


@dataclass(frozen=True)
class Result:
    task_id: bytes
    output: Any
    usage: Usage
    charge: Charge


@dataclass(frozen=True)
class ItemResult:
    output: Any
    usage: Usage


@dataclass(frozen=True)
class ItemError:
    code: str
    message: str


@dataclass(frozen=True)
class BatchResult:
    """A RUN_BATCH's outcome: one item per input, in order; ``charge`` is for the items that ran."""

    task_id: bytes
    items: tuple[ItemResult | ItemError, ...]
    charge: Charge


@dataclass(frozen=True)
class Paid:
    task_id: bytes


@dataclass(frozen=True)
class Accepted:
    count: int


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str


Request = ListModels | Run | Pay | Deliver | RunBatch
Reply = Catalogue | Result | Paid | Accepted | BatchResult | ErrorReply


def receipt_ids(task_id: bytes) -> tuple[bytes, bytes]:
    """The receipt ids of a task's two receipts (executor's, publisher's): derived, so that a
    receipt can only ever be for this task, and the payer's unique task id keeps them unique."""
    import hashlib

    return (
        hashlib.sha256(RECEIPT_ID_DOMAIN + task_id + b"\x00").digest(),
        hashlib.sha256(RECEIPT_ID_DOMAIN + task_id + b"\x01").digest(),
    )


# ------------------------------------------------------------ encoding


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _amount(value: int) -> bytes:
    return value.to_bytes(AMOUNT_SIZE, "big")


def _auth_fields(a: Authorisation) -> list[Any]:
    return [a.payer, a.executor, a.model_id, a.task_id, a.chain_id, _amount(a.max_amount), a.expiry, a.signature]


def encode_request(msg: Request) -> bytes:
    if isinstance(msg, ListModels):
        return _pack([LIST])
    if isinstance(msg, Run):
        return _pack([RUN, msg.model_id, msg.inputs, _auth_fields(msg.auth)])
    if isinstance(msg, Pay):
        return _pack([PAY, msg.task_id, [encode_receipt(r) for r in msg.receipts]])
    if isinstance(msg, RunBatch):
        return encode_run_batch(msg.model_id, [_pack(i) for i in msg.inputs], msg.auth)
    return _pack([DELIVER, [encode_receipt(r) for r in msg.receipts]])


def pack_inputs(inputs: dict[str, Any]) -> bytes:
    """One input of a RUN_BATCH, packed on its own (see ``encode_run_batch``)."""
    return _pack(inputs)


def encode_run_batch(model_id: bytes, packed_inputs: list[bytes], auth: Authorisation) -> bytes:
    """A RUN_BATCH from inputs already packed one by one (a client packs each input once, to
    size its batch, and joins them here without packing them again)."""
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join([packer.pack_array_header(4), packer.pack(RUN_BATCH), packer.pack(model_id),
                     packer.pack_array_header(len(packed_inputs)), *packed_inputs, packer.pack(_auth_fields(auth))])


def _usage_fields(u: Usage) -> list[Any]:
    return [u.tokens_in, u.tokens_out, float(u.wall_ms), u.batch_size, u.device]


def _charge_fields(c: Charge) -> list[Any]:
    return [c.units, _amount(c.price_per_unit), _amount(c.amount), _amount(c.executor_amount), c.publisher,
            _amount(c.publisher_amount)]


def encode_reply(msg: Reply) -> bytes:
    if isinstance(msg, Catalogue):
        return _pack([CATALOGUE, [[e.model_id, e.name, e.version, list(e.tags), e.publisher,
                                   _amount(e.price_per_unit), e.load, e.architecture] for e in msg.entries]])
    if isinstance(msg, Result):
        return _pack([RESULT, msg.task_id, msg.output, _usage_fields(msg.usage), _charge_fields(msg.charge)])
    if isinstance(msg, Paid):
        return _pack([PAID, msg.task_id])
    if isinstance(msg, Accepted):
        return _pack([ACCEPTED, msg.count])
    if isinstance(msg, BatchResult):
        items = [[ITEM_OK, i.output, _usage_fields(i.usage)] if isinstance(i, ItemResult)
                 else [ITEM_ERROR, i.code, _clip(i.message)] for i in msg.items]
        return _pack([BATCH_RESULT, msg.task_id, items, _charge_fields(msg.charge)])
    return encode_error(msg.code, msg.message)


def _clip(message: str) -> str:
    return message.encode("utf-8")[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore")


def encode_error(code: str, message: str) -> bytes:
    assert code in ERROR_CODES, code
    return _pack([ERROR, code, _clip(message)])


# ------------------------------------------------------------ decoding


def _unpack(data: bytes, limit: int) -> list[Any]:
    value = unpack_strict(data, limit, "message", TaskMessageError)
    if type(value) is not list or not value or type(value[0]) is not int:
        raise TaskMessageError("a message is an array that starts with its type")
    return value


def _shape(value: list[Any], n: int, what: str) -> list[Any]:
    if len(value) != n:
        raise TaskMessageError(f"{what} has {len(value)} fields, expected {n}")
    return value


def _bin(value: Any, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise TaskMessageError(f"{what} must be {size} bytes")
    return value


def _uint(value: Any, what: str, hi: int = (1 << 64) - 1) -> int:
    if type(value) is not int or not 0 <= value <= hi:
        raise TaskMessageError(f"{what} must be an integer in [0, {hi}]")
    return value


def _amt(value: Any, what: str) -> int:
    amount = int.from_bytes(_bin(value, AMOUNT_SIZE, what), "big")
    if amount > MAX_AMOUNT:  # pragma: no cover - 16 bytes cannot exceed 2**128-1
        raise TaskMessageError(f"{what} is out of range")
    return amount


def _str(value: Any, what: str, limit: int) -> str:
    if type(value) is not str or len(value) > limit:
        raise TaskMessageError(f"{what} must be a string of at most {limit} characters")
    return value


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if type(value) is not list or len(value) > limit:
        raise TaskMessageError(f"{what} must be an array of at most {limit} items")
    return value


def _receipts(value: Any, what: str) -> tuple[Receipt, ...]:
    items = _list(value, what, MAX_RECEIPTS_PER_MESSAGE)
    if not items:
        raise TaskMessageError(f"{what} must not be empty")
    out = []
    for i, item in enumerate(items):
        if type(item) is not bytes:
            raise TaskMessageError(f"{what}[{i}] must be an encoded receipt")
        try:
            out.append(decode_receipt(item))
        except LedgerDecodeError as exc:
            raise TaskMessageError(f"{what}[{i}]: {exc}") from None
    return tuple(out)


def decode_auth(value: Any) -> Authorisation:
    if type(value) is not list:
        raise TaskMessageError("auth must be an array")
    f = _shape(value, 8, "auth")
    chain_id = _str(f[4], "auth.chain_id", 64)
    if not chain_id:
        raise TaskMessageError("auth.chain_id must not be empty")
    return Authorisation(
        payer=_bin(f[0], ID_SIZE, "auth.payer"),
        executor=_bin(f[1], ID_SIZE, "auth.executor"),
        model_id=_bin(f[2], ID_SIZE, "auth.model_id"),
        task_id=_bin(f[3], ID_SIZE, "auth.task_id"),
        chain_id=chain_id,
        max_amount=_amt(f[5], "auth.max_amount"),
        expiry=_uint(f[6], "auth.expiry"),
        signature=_bin(f[7], 64, "auth.signature"),
    )


def decode_request(data: bytes) -> Request:
    f = _unpack(data, MAX_REQUEST)
    kind = f[0]
    if kind == LIST:
        _shape(f, 1, "LIST")
        return ListModels()
    if kind == RUN:
        _shape(f, 4, "RUN")
        if type(f[2]) is not dict:
            raise TaskMessageError("RUN inputs must be a map")
        auth = decode_auth(f[3])
        model_id = _bin(f[1], ID_SIZE, "RUN model_id")
        if auth.model_id != model_id:
            raise TaskMessageError("RUN model_id differs from the authorisation's")
        return Run(model_id, f[2], auth)
    if kind == PAY:
        _shape(f, 3, "PAY")
        return Pay(_bin(f[1], ID_SIZE, "PAY task_id"), _receipts(f[2], "PAY receipts"))
    if kind == DELIVER:
        _shape(f, 2, "DELIVER")
        return Deliver(_receipts(f[1], "DELIVER receipts"))
    if kind == RUN_BATCH:
        _shape(f, 4, "RUN_BATCH")
        items = _list(f[2], "RUN_BATCH inputs", MAX_BATCH_ITEMS)
        if not items:
            raise TaskMessageError("RUN_BATCH inputs must not be empty")
        if not all(type(i) is dict for i in items):
            raise TaskMessageError("RUN_BATCH inputs must be maps")
        auth = decode_auth(f[3])
        model_id = _bin(f[1], ID_SIZE, "RUN_BATCH model_id")
        if auth.model_id != model_id:
            raise TaskMessageError("RUN_BATCH model_id differs from the authorisation's")
        return RunBatch(model_id, tuple(items), auth)
    raise TaskMessageError(f"unknown request type {kind}")


def _usage(value: Any) -> Usage:
    f = _shape(_list(value, "usage", 5), 5, "usage")
    wall = f[2]
    if not isinstance(wall, float | int) or isinstance(wall, bool) or not math.isfinite(wall) or wall < 0:
        raise TaskMessageError("usage.wall_ms must be a finite number >= 0")
    return Usage(_uint(f[0], "usage.tokens_in"), _uint(f[1], "usage.tokens_out"), float(wall),
                 _uint(f[3], "usage.batch_size"), _str(f[4], "usage.device", MAX_DEVICE_LEN))


def _charge(value: Any) -> Charge:
    f = _shape(_list(value, "charge", 6), 6, "charge")
    c = Charge(_uint(f[0], "charge.units"), _amt(f[1], "charge.price_per_unit"), _amt(f[2], "charge.amount"),
               _amt(f[3], "charge.executor_amount"), _bin(f[4], ID_SIZE, "charge.publisher"),
               _amt(f[5], "charge.publisher_amount"))
    if c.executor_amount + c.publisher_amount != c.amount:
        raise TaskMessageError("charge shares do not add up to its amount")
    return c


def _entry(value: Any, i: int) -> CatalogueEntry:
    f = _shape(_list(value, f"entry {i}", 8), 8, f"entry {i}")
    tags = _list(f[3], f"entry {i} tags", 32)
    if type(f[7]) is not dict:
        raise TaskMessageError(f"entry {i} architecture must be a map")
    return CatalogueEntry(
        model_id=_bin(f[0], ID_SIZE, f"entry {i} model_id"),
        name=_str(f[1], f"entry {i} name", 128),
        version=_str(f[2], f"entry {i} version", 64),
        tags=tuple(_str(t, f"entry {i} tag", 64) for t in tags),
        publisher=_bin(f[4], ID_SIZE, f"entry {i} publisher"),
        price_per_unit=_amt(f[5], f"entry {i} price"),
        load=_uint(f[6], f"entry {i} load"),
        architecture=f[7],
    )


def decode_reply(data: bytes) -> Reply:
    f = _unpack(data, MAX_REPLY)
    kind = f[0]
    if kind == ERROR:
        _shape(f, 3, "ERROR")
        return ErrorReply(_str(f[1], "error code", 32), _str(f[2], "error message", MAX_ERROR_MESSAGE))
    if kind == CATALOGUE:
        _shape(f, 2, "CATALOGUE")
        return Catalogue(tuple(_entry(e, i) for i, e in enumerate(_list(f[1], "entries", MAX_CATALOGUE))))
    if kind == RESULT:
        _shape(f, 5, "RESULT")
        return Result(_bin(f[1], ID_SIZE, "RESULT task_id"), f[2], _usage(f[3]), _charge(f[4]))
    if kind == PAID:
        _shape(f, 2, "PAID")
        return Paid(_bin(f[1], ID_SIZE, "PAID task_id"))
    if kind == ACCEPTED:
        _shape(f, 2, "ACCEPTED")
        return Accepted(_uint(f[1], "ACCEPTED count"))
    if kind == BATCH_RESULT:
        _shape(f, 4, "BATCH_RESULT")
        items = _list(f[2], "BATCH_RESULT items", MAX_BATCH_ITEMS)
        return BatchResult(_bin(f[1], ID_SIZE, "BATCH_RESULT task_id"),
                           tuple(_item(v, i) for i, v in enumerate(items)), _charge(f[3]))
    raise TaskMessageError(f"unknown reply type {kind}")


def _item(value: Any, i: int) -> ItemResult | ItemError:
    f = _shape(_list(value, f"item {i}", 3), 3, f"item {i}")
    if f[0] == ITEM_OK and type(f[0]) is int:
        return ItemResult(f[1], _usage(f[2]))
    if f[0] == ITEM_ERROR and type(f[0]) is int:
        return ItemError(_str(f[1], f"item {i} code", 32), _str(f[2], f"item {i} message", MAX_ERROR_MESSAGE))
    raise TaskMessageError(f"item {i} status must be {ITEM_OK} or {ITEM_ERROR}")

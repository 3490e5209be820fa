"""Control-socket methods of the ledger: ``ledger.status``, ``ledger.balance``,
``ledger.transfer`` / ``stake`` / ``unstake`` / ``submit``, ``ledger.tx``, ``ledger.block``,
``ledger.history`` and ``ledger.verify`` (protocols/control.md lists their parameters).

Amounts travel as exact decimal strings in FTNS ("1.5") beside the integer in units as a
string (JSON numbers are doubles). Txs the node signs use its own key and next nonce.
"""

from __future__ import annotations

from typing import Any

import trio

from ..control.server import ControlServer, RequestError, param
from ..exceptions import StoreError
from ..ledger.block import Block
from ..ledger.codec import decode_tx, tx_hash
from ..ledger.exceptions import InvalidAmountString, LedgerDecodeError, LedgerError, TxRejected
from ..ledger.mempool import Pending
from ..ledger.storage import TxLocation
from ..ledger.types import Account, Body, Settle, Stake, Transfer, Tx, Unstake, format_amount, parse_amount
from .messages import MAX_SUBMIT_MANY
from .net import ChainNet
from .service import ChainService

MAX_HISTORY = 1000


def amount_json(units: int) -> dict[str, str]:
    return {"ftns": format_amount(units), "units": str(units)}


def parse_account(text: str, name: str = "account") -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise RequestError("invalid_params", f"{name} must be 64 hex characters (an Ed25519 public key), got {text!r}")
    return raw


def _amount_param(params: dict[str, Any], name: str, default: str | None = None) -> int:
    text = param(params, name, str, default) if default is not None else param(params, name, str)
    try:
        return parse_amount(text)
    except (InvalidAmountString, LedgerError) as exc:
        raise RequestError("invalid_params", f"{name}: {exc}") from None


def tx_json(tx: Tx) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hash": tx_hash(tx).hex(),
        "sender": tx.sender.hex(),
        "nonce": tx.nonce,
        "fee": amount_json(tx.fee),
    }
    body = tx.body
    if isinstance(body, Transfer):
        out.update(kind="transfer", to=body.to.hex(), amount=amount_json(body.amount))
    elif isinstance(body, Stake):
        out.update(kind="stake", amount=amount_json(body.amount))
    elif isinstance(body, Unstake):
        out.update(kind="unstake", amount=amount_json(body.amount))
    elif isinstance(body, Settle):
        out.update(
            kind="settle",
            receipts=[
                {"id": r.receipt_id.hex(), "payer": r.payer.hex(), "amount": amount_json(r.amount)}
                for r in body.receipts
            ],
            amount=amount_json(sum(r.amount for r in body.receipts)),
        )
    return out


def block_json(block: Block, *, with_txs: bool = True) -> dict[str, Any]:
    h = block.header
    out: dict[str, Any] = {
        "height": h.height,
        "hash": block.hash().hex(),
        "prev_hash": h.prev_hash.hex(),
        "time_ms": h.time_ms,
        "proposer": h.proposer.hex(),
        "tx_count": h.tx_count,
        "tx_root": h.tx_root.hex(),
        "state_hash": h.state_hash.hex(),
    }
    if with_txs:
        out["txs"] = [tx_json(decode_tx(t)) for t in block.txs]
    return out


def account_json(key: bytes, a: Account, next_nonce: int) -> dict[str, Any]:
    return {
        "account": key.hex(),
        "balance": amount_json(a.balance),
        "stake": amount_json(a.stake),
        "unbonding": [{"amount": amount_json(x), "release_height": h} for x, h in a.unbonding],
        "nonce": a.nonce,
        "next_nonce": next_nonce,
    }


class LedgerMethods:
    def __init__(self, chain: ChainService, net: ChainNet) -> None:
        self.chain = chain
        self.net = net

    def register(self, server: ControlServer) -> None:
        for name in (
            "status",
            "balance",
            "transfer",
            "stake",
            "unstake",
            "submit",
            "submit_many",
            "tx",
            "block",
            "history",
            "verify",
            "wait_height",
        ):
            server.register(f"ledger.{name}", getattr(self, name))

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        async with self.chain.committed_state() as state:
            return {
                "chain_id": state.chain_id,
                "height": self.chain.tip.height,
                "block_hash": self.chain.tip.hash.hex(),
                "state_hash": state.state_hash().hex(),
                "total_supply": amount_json(state.total_supply),
                "minted": amount_json(state.minted),
                "validators": len(self.chain.validators),
                **self.chain.statistics(),
                **self.net.statistics(),
            }

    async def balance(self, params: dict[str, Any]) -> dict[str, Any]:
        text = param(params, "account", str, "")
        key = parse_account(text) if text else self.chain.account
        async with self.chain.committed_state() as state:
            return account_json(key, state.account(key), self.chain.mempool.next_nonce(key))

    async def transfer(self, params: dict[str, Any]) -> dict[str, Any]:
        to = parse_account(param(params, "to", str), "to")
        return await self._sign_and_submit(Transfer(to, _amount_param(params, "amount")), params)

    async def stake(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._sign_and_submit(Stake(_amount_param(params, "amount")), params)

    async def unstake(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._sign_and_submit(Unstake(_amount_param(params, "amount")), params)

    async def _sign_and_submit(self, body: Body, params: dict[str, Any]) -> dict[str, Any]:
        return await self._submit(None, params, body=body, fee=_amount_param(params, "fee", "0"))

    async def submit(self, params: dict[str, Any]) -> dict[str, Any]:
        """A tx signed elsewhere, as hex of its canonical encoding."""
        text = param(params, "tx", str)
        try:
            data = bytes.fromhex(text)
        except ValueError:
            raise RequestError("invalid_params", "tx must be hex of a canonical encoded transaction") from None
        try:
            tx = decode_tx(data)
        except LedgerDecodeError as exc:
            raise RequestError(exc.code, str(exc)) from None
        return await self._submit(tx, params)

    async def submit_many(self, params: dict[str, Any]) -> dict[str, Any]:
        """Many txs signed elsewhere (hex), admitted in order with one batched signature check;
        never waits for commits. Per tx: its hash, or the error code and message that refused it."""
        texts = param(params, "txs", list)
        if not 1 <= len(texts) <= MAX_SUBMIT_MANY:
            raise RequestError("invalid_params", f"txs must hold 1..{MAX_SUBMIT_MANY} transactions")
        results: list[dict[str, Any] | None] = [None] * len(texts)
        txs: list[Tx] = []
        where: list[int] = []
        for i, text in enumerate(texts):
            try:
                txs.append(decode_tx(bytes.fromhex(text) if type(text) is str else b""))
                where.append(i)
            except ValueError:
                results[i] = {"code": "invalid_params", "error": f"txs[{i}] is not hex of an encoded transaction"}
            except LedgerDecodeError as exc:
                results[i] = {"code": exc.code, "error": str(exc)}
        for i, result in zip(where, await self.net.submit_many(txs), strict=True):
            if isinstance(result, Pending):
                results[i] = {"hash": result.hash.hex()}
            else:
                results[i] = {"code": result.code, "error": str(result)}
        return {"accepted": sum(1 for r in results if r is not None and "hash" in r), "results": results}

    async def _submit(
        self, tx: Tx | None, params: dict[str, Any], *, body: Body | None = None, fee: int = 0
    ) -> dict[str, Any]:
        wait = param(params, "wait", bool, True)
        timeout = param(params, "timeout", float, self.chain.cfg.confirm_timeout)
        if not 0 < timeout <= 600:
            raise RequestError("invalid_params", "timeout must be in (0, 600] seconds")
        try:
            entry = await self.net.submit(tx, body=body, fee=fee)
        except (TxRejected, LedgerDecodeError) as exc:
            raise RequestError(exc.code, str(exc)) from None
        out = {"hash": entry.hash.hex(), "status": "pending", **tx_json(entry.tx)}
        if not wait:
            return out
        with trio.move_on_after(timeout):
            found = await self.chain.wait_committed(entry.hash)
            return {**out, "status": "committed", "height": found.height, "block_hash": found.block_hash.hex()}
        raise RequestError(
            "timeout", f"tx {entry.hash.hex()} is pending, not committed after {timeout} s (see `ledger tx`)"
        )

    def _tx_hash_param(self, params: dict[str, Any]) -> bytes:
        text = param(params, "hash", str)
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise RequestError("invalid_params", f"hash must be 64 hex characters, got {text!r}")
        return digest

    async def tx(self, params: dict[str, Any]) -> dict[str, Any]:
        digest = self._tx_hash_param(params)
        found = self.chain.ledger.locate(digest)
        if found is not None:
            block = self.chain.ledger.block(found.height)
            tx = decode_tx(block.txs[found.index])
            return {
                **tx_json(tx),
                "status": "committed",
                "height": found.height,
                "index": found.index,
                "block_hash": block.hash().hex(),
                "time_ms": block.header.time_ms,
            }
        pending = self.chain.mempool.get(digest)
        if pending is not None:
            return {**tx_json(pending.tx), "status": "pending"}
        raise RequestError("not_found", f"no tx {digest.hex()} in the ledger or the mempool")

    async def block(self, params: dict[str, Any]) -> dict[str, Any]:
        height = param(params, "height", int, self.chain.tip.height)
        tip = self.chain.tip.height
        if height < 1 or height > tip:
            held = f"the ledger holds blocks 1 to {tip}" if tip else "the ledger has no block yet (height 0: genesis)"
            raise RequestError("not_found", f"no block {height}: {held}")
        with_txs = param(params, "txs", bool, True)
        return block_json(self.chain.ledger.block(height), with_txs=with_txs)

    async def history(self, params: dict[str, Any]) -> dict[str, Any]:
        text = param(params, "account", str, "")
        key = parse_account(text) if text else self.chain.account
        limit = param(params, "limit", int, 50)
        before_height = param(params, "before", int, 0)
        before_index = param(params, "before_index", int, 0)
        if before_height < 0 or before_index < 0:
            raise RequestError("invalid_params", "before and before_index must not be negative")
        before = TxLocation(before_height, before_index) if before_height else None
        if not 1 <= limit <= MAX_HISTORY:
            raise RequestError("invalid_params", f"limit must be in [1, {MAX_HISTORY}]")
        entries = []
        for where, _ in self.chain.ledger.history(key, limit=limit, before=before):
            block = self.chain.ledger.block(where.height)
            tx = decode_tx(block.txs[where.index])
            time_ms = block.header.time_ms
            entries.append({**tx_json(tx), "height": where.height, "index": where.index, "time_ms": time_ms})
        return {"account": key.hex(), "txs": entries}

    async def wait_height(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until the ledger reaches ``height`` (tests and scripts wait on this)."""
        height = param(params, "height", int)
        timeout = param(params, "timeout", float, 60.0)
        if not 0 < timeout <= 600:
            raise RequestError("invalid_params", "timeout must be in (0, 600] seconds")
        with trio.move_on_after(timeout):
            await self.chain.wait_height(height)
            return {"height": self.chain.tip.height}
        raise RequestError("timeout", f"the ledger is at height {self.chain.tip.height} after {timeout} s")

    async def verify(self, params: dict[str, Any]) -> dict[str, Any]:
        """Replay every stored block from genesis (all signatures re-checked) and compare."""
        async with self.chain.committed_state() as state:
            live_height, live_hash = self.chain.tip.height, state.state_hash()
        try:
            replayed = await trio.to_thread.run_sync(self.chain.ledger.replay)
        except StoreError as exc:
            raise RequestError("corrupt", str(exc)) from None
        stored = self.chain.ledger.block(replayed.height).header.state_hash if replayed.height else None
        ok = (stored is None or replayed.state_hash() == stored) and (
            replayed.height != live_height or replayed.state_hash() == live_hash
        )
        return {
            "ok": ok,
            "height": replayed.height,
            "replayed_state_hash": replayed.state_hash().hex(),
            "stored_state_hash": stored.hex() if stored else None,
            "live_height": live_height,
            "live_state_hash": live_hash.hex(),
        }

"""Control-socket methods of the circuit breaker (protocols/breaker.md, "Control methods"):
``breaker.vote``, ``breaker.status``, ``breaker.history``, ``breaker.wait_state``,
``breaker.wait_votes``, ``breaker.wait_recorded`` and ``breaker.wait_mesh``. Stakes travel as
decimal strings of units (JSON numbers are doubles).
"""

from __future__ import annotations

import math
from typing import Any

import trio

from ..control.server import ControlServer, RequestError, param
from ..ledger.codec import decode_tx, tx_hash
from ..ledger.types import BreakerVote
from .exceptions import BreakerError, Unstaked
from .service import BreakerService
from .tally import ModelStatus, Transition
from .votes import MAX_REASON_BYTES, Action, vote_id

MAX_WAIT = 600.0
MAX_HISTORY = 10_000


def parse_model(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise RequestError("invalid_params", f"model must be 64 hex characters (a manifest id), got {text!r}")
    return raw


def _timeout(params: dict[str, Any]) -> float:
    timeout: float = param(params, "timeout", float, 30.0)
    if not 0 < timeout <= MAX_WAIT:
        raise RequestError("invalid_params", f"timeout must be in (0, {MAX_WAIT}] seconds")
    return timeout


def transition_json(t: Transition | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {
        "state": t.state.name.lower(),
        "cause": t.cause.name.lower(),
        "vote": vote_id(t.vote).hex() if t.vote else None,
        "voter": t.vote.voter.hex() if t.vote else None,
        "time_ms": t.vote.timestamp_ms if t.vote else None,
        "halt_stake": str(t.halt_stake),
        "resume_stake": str(t.resume_stake),
        "total_stake": str(t.total_stake),
        "height": t.height,
    }


class BreakerMethods:
    def __init__(self, service: BreakerService) -> None:
        self.service = service

    def register(self, server: ControlServer) -> None:
        for name in ("vote", "status", "history", "wait_state", "wait_votes", "wait_recorded", "wait_mesh"):
            server.register(f"breaker.{name}", getattr(self, name))

    def _recorded(self, model: bytes, voter: bytes) -> dict[str, Any] | None:
        """The ledger's record of this voter's latest vote on the model: epoch and height."""
        record = self.service.chain.committed_vote_record(model, voter)
        if record is None:
            return None
        return {"epoch": record.vote.epoch, "action": record.vote.action.name.lower(), "height": record.height}

    def _status_json(self, s: ModelStatus) -> dict[str, Any]:
        p = self.service.params
        total = s.total_stake
        return {
            "model": s.model.hex(),
            "state": "halted" if s.halted else "running",
            "network_state": s.state.name.lower(),
            "self_halted": s.self_halted,
            "halt_stake": str(s.halt_stake),
            "resume_stake": str(s.resume_stake),
            "total_stake": str(total),
            "halt_threshold": f"{p.halt_threshold.numerator}/{p.halt_threshold.denominator}",
            "resume_threshold": f"{p.resume_threshold.numerator}/{p.resume_threshold.denominator}",
            "halt_needed": str(math.ceil(p.halt_threshold * total)),
            "resume_needed": str(math.ceil(p.resume_threshold * total)),
            "voters": [
                {
                    "voter": v.voter.hex(),
                    "action": v.action.name.lower(),
                    "reason": v.reason,
                    "epoch": v.epoch,
                    "timestamp_ms": v.timestamp_ms,
                    "stake": str(v.stake),
                    "recorded": self._recorded(s.model, v.voter),
                }
                for v in s.voters
            ],
            "changed": transition_json(s.changed),
            "halted_since_ms": self.service.halted_since(s.model),
        }

    async def vote(self, params: dict[str, Any]) -> dict[str, Any]:
        model = parse_model(param(params, "model", str))
        action_text = param(params, "action", str)
        if action_text not in ("halt", "resume"):
            raise RequestError("invalid_params", f"action must be halt or resume, got {action_text!r}")
        reason = param(params, "reason", str, "")
        if len(reason.encode("utf-8", "replace")) > MAX_REASON_BYTES:
            raise RequestError("invalid_params", f"reason must be at most {MAX_REASON_BYTES} UTF-8 bytes")
        action = Action.HALT if action_text == "halt" else Action.RESUME
        try:
            vote = await self.service.vote(model, action, reason)
        except Unstaked as exc:
            hint = "only staked accounts vote: stake first with `prsm-node ledger stake AMOUNT`"
            raise RequestError(exc.code, f"{exc}; {hint}") from None
        except BreakerError as exc:
            raise RequestError(exc.code, str(exc)) from None
        return {
            "vote": vote_id(vote).hex(),
            "epoch": vote.epoch,
            "timestamp_ms": vote.timestamp_ms,
            **self._status_json(self.service.tally.status(model, self.service._stake_table())),
        }

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        text = param(params, "model", str, "")
        stakes = self.service._stake_table()
        tally = self.service.tally
        if text:
            return self._status_json(tally.status(parse_model(text), stakes))
        return {
            "models": [self._status_json(tally.status(m, stakes)) for m in tally.models()],
            "statistics": self.service.statistics(),
        }

    async def history(self, params: dict[str, Any]) -> dict[str, Any]:
        """The votes on ``model`` that blocks recorded (ledger BreakerVote txs), oldest first,
        each with its block height, tx index and hash and the validator that submitted it."""
        model = parse_model(param(params, "model", str))
        limit = param(params, "limit", int, 1000)
        if not 1 <= limit <= MAX_HISTORY:
            raise RequestError("invalid_params", f"limit must be in [1, {MAX_HISTORY}]")
        chain = self.service.chain

        def read() -> list[dict[str, Any]]:
            out = []
            for where, digest in chain.ledger.vote_history(model, limit=limit):
                tx = decode_tx(chain.ledger.block(where.height).txs[where.index])
                assert isinstance(tx.body, BreakerVote) and tx_hash(tx) == digest
                v = tx.body.vote
                out.append(
                    {
                        "height": where.height,
                        "index": where.index,
                        "tx": digest.hex(),
                        "submitter": tx.sender.hex(),
                        "voter": v.voter.hex(),
                        "action": v.action.name.lower(),
                        "epoch": v.epoch,
                        "timestamp_ms": v.timestamp_ms,
                        "reason": v.reason,
                        "vote": vote_id(v).hex(),
                    }
                )
            return out

        return {"model": model.hex(), "height": chain.tip.height, "votes": await trio.to_thread.run_sync(read)}

    async def wait_recorded(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until the ledger records at least ``count`` votes (latest per voter and
        model; of ``model`` if given)."""
        count = param(params, "count", int)
        text = param(params, "model", str, "")
        model = parse_model(text) if text else None
        timeout = _timeout(params)
        chain = self.service.chain
        got = 0
        with trio.move_on_after(timeout):
            while True:
                got = sum(1 for _ in chain.committed_vote_records(model))
                if got >= count:
                    return {"recorded": got, "height": chain.tip.height}
                await chain.wait_height(chain.tip.height + 1)
        raise RequestError("timeout", f"{got} votes recorded after {timeout} s, wanted {count}")

    async def wait_state(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until ``model`` is ``state`` (halted: what enforcement obeys; running)."""
        model = parse_model(param(params, "model", str))
        state = param(params, "state", str)
        if state not in ("halted", "running"):
            raise RequestError("invalid_params", f"state must be halted or running, got {state!r}")
        timeout = _timeout(params)
        with trio.move_on_after(timeout):
            await self.service.wait_state(model, state == "halted")
            return self._status_json(self.service.tally.status(model, self.service._stake_table()))
        raise RequestError("timeout", f"model {model.hex()} is not {state} after {timeout} s")

    async def wait_votes(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until the tally counts at least ``count`` votes (latest per voter and model)."""
        count = param(params, "count", int)
        timeout = _timeout(params)
        with trio.move_on_after(timeout):
            await self.service.wait_votes(count)
            return self.service.statistics()
        raise RequestError("timeout", f"{self.service.statistics()['votes']} votes after {timeout} s, wanted {count}")

    async def wait_mesh(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until ``peers`` peers are subscribed to the topic and at least
        ``min(peers, D_low)`` are in this node's mesh (the heartbeat builds it)."""
        peers = param(params, "peers", int)
        timeout = _timeout(params)
        want_mesh = min(peers, 4)
        with trio.move_on_after(timeout):
            while True:
                if self.service.topic_peers() >= peers and self.service.mesh_peers() >= want_mesh:
                    return self.service.statistics()
                await trio.sleep(0.05)  # gossipsub has no event for mesh changes
        raise RequestError("timeout", f"topic/mesh peers {self.service.statistics()} after {timeout} s")

"""Control-socket methods of the circuit breaker (protocols/breaker.md, "Control methods"):
``breaker.vote``, ``breaker.status``, ``breaker.wait_state``, ``breaker.wait_votes`` and
``breaker.wait_mesh``. Stakes travel as decimal strings of units (JSON numbers are doubles).
"""

from __future__ import annotations

import math
from typing import Any

import trio

from ..control.server import ControlServer, RequestError, param
from .exceptions import VoteRejected
from .service import BreakerService
from .tally import ModelStatus, Transition
from .votes import MAX_REASON_BYTES, Action, vote_id

MAX_WAIT = 600.0


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
        for name in ("vote", "status", "wait_state", "wait_votes", "wait_mesh"):
            server.register(f"breaker.{name}", getattr(self, name))

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
        except VoteRejected as exc:
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

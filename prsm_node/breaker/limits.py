"""Per-voter vote limits (protocols/breaker.md, "Vote limits"): pure, the clock is passed in.

A staked voter could otherwise flood the network with validly signed votes (a new epoch every
millisecond, or votes on thousands of models). In each fixed window of ``vote_window_ms`` of
the local clock, a node relays at most ``max_votes_per_model`` votes of one voter on one model
and votes of one voter on at most ``max_models_per_voter`` distinct models; the rest is
dropped (RateLimited) and not forwarded.

Only votes that passed every other check count (a forged vote must not spend its claimed
voter's allowance). An honest relay applies the same limits in its own window, which overlaps
at most two of ours, so within one of our windows it forwards at most twice the limits for
one voter; a relay over that is not enforcing them and is penalised (``relay_over``).
"""

from __future__ import annotations

import collections

from .exceptions import RateLimited
from .params import BreakerParams

MAX_TRACKED = 200_000  # (voter, model) and (relay, voter, model) entries per window


class VoteLimiter:
    def __init__(self, params: BreakerParams) -> None:
        self.params = params
        self._window = -1
        self._votes: collections.Counter[tuple[bytes, bytes]] = collections.Counter()  # (voter, model)
        self._models: dict[bytes, set[bytes]] = {}  # voter -> models voted on in this window
        self._relayed: collections.Counter[tuple[bytes, bytes, bytes]] = collections.Counter()
        self._relayed_models: dict[tuple[bytes, bytes], set[bytes]] = {}  # (relay, voter) -> models

    def _roll(self, now_ms: int) -> None:
        window = now_ms // self.params.vote_window_ms
        if window != self._window or len(self._votes) + len(self._relayed) > MAX_TRACKED:
            self._window = window
            self._votes.clear()
            self._models.clear()
            self._relayed.clear()
            self._relayed_models.clear()

    def check(self, voter: bytes, model: bytes, now_ms: int) -> None:
        """Raise RateLimited if one more vote of ``voter`` on ``model`` is over a limit."""
        self._roll(now_ms)
        p = self.params
        if self._votes[(voter, model)] >= p.max_votes_per_model:
            raise RateLimited(
                f"voter {voter.hex()} already has {p.max_votes_per_model} votes on model {model.hex()} "
                f"in this {p.vote_window_ms} ms window"
            )
        models = self._models.get(voter)
        if models is not None and model not in models and len(models) >= p.max_models_per_voter:
            raise RateLimited(
                f"voter {voter.hex()} already voted on {p.max_models_per_voter} models in this "
                f"{p.vote_window_ms} ms window"
            )

    def record(self, voter: bytes, model: bytes, now_ms: int) -> None:
        """Count an accepted vote."""
        self._roll(now_ms)
        self._votes[(voter, model)] += 1
        self._models.setdefault(voter, set()).add(model)

    def relay_over(self, relay: bytes, voter: bytes, model: bytes, now_ms: int) -> bool:
        """Count a vote ``relay`` forwarded (accepted or limited); True when that relay has
        now forwarded more than twice what the limits let an honest relay forward."""
        self._roll(now_ms)
        p = self.params
        self._relayed[(relay, voter, model)] += 1
        models = self._relayed_models.setdefault((relay, voter), set())
        models.add(model)
        return (
            self._relayed[(relay, voter, model)] > 2 * p.max_votes_per_model or len(models) > 2 * p.max_models_per_voter
        )

"""The agents service of a node: the model runtime, ``/prsm/task/1.0.0`` with its settlement,
and the NWTN pipeline; plus the ``agents.*`` control methods.

Starting it costs nothing heavy: torch is imported by the runtime's first model load, which
happens only when this node runs a model (a task for a model it hosts, or a local subtask).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .._trio import TaskStatus
from ..control.server import ControlServer, RequestError, param
from ..ledger.exceptions import LedgerError
from ..ledger.params import LedgerParams
from ..ledger.types import format_amount, parse_amount
from .nwtn.pipeline import OverBudget, Pipeline
from .nwtn.router import Router
from .pricing import royalty_from_genesis
from .runtime import ModelRuntime, RuntimeConfig
from .task import TaskLimits, TaskService

DEFAULT_BUDGET = 10**18  # 1 FTNS
MAX_QUERY_CHARS = 4096
MAX_ASK_TIMEOUT = 600.0
CORPUS = Path(__file__).resolve().parent.parent.parent / "data" / "corpus" / "newton_opticks.txt"


def runtime_config(section: Any) -> RuntimeConfig:
    """The runtime's settings from the ``[agents]`` config section."""
    return RuntimeConfig(device=section.device, memory_limit_bytes=section.memory_limit_bytes,
                         max_batch_size=section.max_batch_size, max_batch_wait_s=section.max_batch_wait_s,
                         max_queue=section.max_queue, torch_threads=section.torch_threads)


class AgentService:
    def __init__(self, node: Any, *, is_halted: Callable[[bytes], bool], limits: TaskLimits | None = None,
                 corpus: Path | None = CORPUS, settle_interval: float = 1.0) -> None:
        self.node = node
        self.runtime = ModelRuntime(runtime_config(node.cfg.agents))
        genesis = node.genesis
        fee = LedgerParams.from_genesis_params(genesis.params).min_fee
        self.tasks = TaskService(
            node.host, node.kad, node.key, node.chain_net, node.shards, self.runtime,
            node.store.namespace("agents"), chain_id=genesis.chain_id, royalty=royalty_from_genesis(genesis.params),
            fee=fee, is_halted=is_halted, limits=limits, settle_interval=settle_interval,
        )
        self.router = Router(self.tasks, is_halted, providers=getattr(node.shards, "providers", None))
        self.pipeline = Pipeline(self.tasks, self.router, corpus)
        breaker = getattr(node, "breaker", None)
        if breaker is not None:  # a halt cancels this node's executions of the model at once
            breaker.on_change.append(self._on_breaker_change)

    def _on_breaker_change(self, model_id: bytes, halted: bool) -> None:
        if halted:
            self.tasks.halt(model_id)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.runtime.serve)
            await nursery.start(self.tasks.run)
            task_status.started()
            await trio.sleep_forever()

    def register(self, server: ControlServer) -> None:
        server.register("agents.ask", self.ask)
        server.register("agents.status", self.status)

    async def ask(self, params: dict[str, Any]) -> dict[str, Any]:
        query = param(params, "query", str)
        if not query.strip() or len(query) > MAX_QUERY_CHARS:
            raise RequestError("invalid_params", f"query must be 1 to {MAX_QUERY_CHARS} characters")
        budget_text = param(params, "budget", str, format_amount(DEFAULT_BUDGET))
        try:
            budget = parse_amount(budget_text)
        except LedgerError as exc:
            raise RequestError("invalid_params", f"budget: {exc}") from None
        timeout = param(params, "timeout", float, 120.0)
        if not 0 < timeout <= MAX_ASK_TIMEOUT:
            raise RequestError("invalid_params", f"timeout must be in (0, {MAX_ASK_TIMEOUT}]")
        try:
            with trio.fail_after(timeout):
                answer = await self.pipeline.ask(query, budget)
        except OverBudget as exc:
            raise RequestError("over_budget", f"{exc} (estimate {exc.estimate})") from None
        except trio.TooSlowError:
            raise RequestError("timeout", f"no answer within {timeout} s") from None
        if answer.steps and all(step.error for step in answer.steps):
            why = "; ".join(f"{step.task.name}: {step.error}" for step in answer.steps)
            raise RequestError("no_answer", f"no model on the network could answer ({why})")
        return answer.to_dict()

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        hosted = await self.tasks.hosted()
        return {
            "runtime": self.runtime.statistics().to_dict(),
            "hosted": [{"model_id": mid.hex(), "name": h.name, "family": h.spec.family,
                        "price_per_unit": str(self.tasks.price_of(h))} for mid, h in sorted(hosted.items())],
            "tasks": self.tasks.statistics(),
            "queries_answered": self.pipeline.asked,
            "router": {"refreshes": self.router.refreshes, "lookups": self.router.lookups,
                       "candidates": [{"peer": str(c.peer) if c.peer else "local", "model_id": c.model_id.hex(),
                                       "rank": list(self.router.rank(c)), "via": c.via}
                                      for c in self.router.candidates]},
            "embedding_cache": {"vectors": len(self.pipeline.embeddings), "hits": self.pipeline.embeddings.hits,
                                "misses": self.pipeline.embeddings.misses,
                                "shared": self.pipeline.embeddings.shared},
        }

"""The NWTN pipeline: plan, route, check the budget, execute, compile.

**Budget.** Before anything runs, each subtask's worst-case cost is estimated: the largest
inputs the prompter can produce for it (``prompter.worst_case``) give ``max_units``, times the
highest price among the providers it may be tried on (at most ``MAX_ATTEMPTS``; local ones cost
nothing). The sum must be within the budget, else ``OverBudget`` carries the estimate and
nothing has been run or paid. Each remote run authorises at most ``max_units(real inputs) ×
that provider's price``, so the total charged never exceeds the estimate.

**Executor.** Waves of independent subtasks run in parallel. A subtask tries its candidates in
rank order: locally when this node hosts the model, else over ``/prsm/task/1.0.0``; on a
failure (peer gone mid-task, busy, bad answer) it moves to the next candidate. A model found
halted (here, or by an executor that stopped the task for a circuit-breaker halt) is not tried
on any other peer: the halt is network-wide. A subtask no reachable model can run is skipped,
and the retrieval reads the corpus only when it runs. Every attempt is kept in the trace.

**Batching and caching.** Concurrent queries' subtasks for one model on one peer go out as
one batched task (``task_client``), and the retrieval takes the corpus passages' vectors it
has already been paid for from an ``EmbeddingCache`` (``cache.py``: the same answer, fewer
texts sent), or waits for them when another query's request is fetching them; the trace says
how many it did not send (``cached``).

**Compiler.** The answer is the nearest passage, the topic, and the continuation, with a trace
row per subtask: model, peer, milliseconds, compute units and cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ...ledger.types import format_amount
from ...logs import kv
from ..exceptions import AgentError
from ..inputs import parse_input
from ..pricing import max_units, units
from ..specs import EmbedderConfig
from ..task import TaskFailed, TaskService
from . import prompter
from .architect import PassageIndex, Subtask, load_passages, plan, waves
from .cache import EmbeddingCache, cosines, unit_vector
from .router import Candidate, Router

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class OverBudget(AgentError):
    """Raised before anything runs when the estimated maximum cost exceeds the budget."""

    def __init__(self, estimate: int, budget: int) -> None:
        super().__init__(f"estimated cost up to {format_amount(estimate)} FTNS exceeds the budget "
                         f"of {format_amount(budget)} FTNS")
        self.estimate = estimate
        self.budget = budget


@dataclass
class Step:
    task: Subtask
    candidates: list[Candidate]
    estimate: int = 0
    output: Any = None
    result: dict[str, Any] | None = None
    model: str | None = None
    model_id: str | None = None
    peer: str | None = None
    ms: float = 0.0
    units: int = 0
    cost: int = 0
    receipts: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    cached: int = 0  # passage vectors taken from the cache instead of being sent
    batch: int = 1  # requests in the remote task this one went in

    def trace(self) -> dict[str, Any]:
        return {
            "subtask": self.task.name, "capability": self.task.capability,
            "depends_on": list(self.task.depends_on), "model": self.model, "model_id": self.model_id,
            "peer": self.peer, "ms": round(self.ms, 2), "units": self.units, "cost": str(self.cost),
            "cost_ftns": format_amount(self.cost), "estimate": str(self.estimate), "attempts": self.attempts,
            "receipts": self.receipts, "error": self.error, "cached": self.cached, "batch": self.batch,
        }


@dataclass
class Answer:
    query: str
    text: str
    budget: int
    estimate: int
    cost: int
    ms: float
    steps: list[Step]
    registry: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query, "answer": self.text, "budget": str(self.budget), "estimate": str(self.estimate),
            "cost": str(self.cost), "cost_ftns": format_amount(self.cost), "ms": round(self.ms, 2),
            "trace": [s.trace() for s in self.steps], "registry": self.registry,
        }


class Pipeline:
    def __init__(self, tasks: TaskService, router: Router, corpus: Path | None) -> None:
        self.tasks = tasks
        self.router = router
        self.corpus = corpus
        self._index: PassageIndex | None = None
        self.embeddings = EmbeddingCache()
        self.asked = 0

    async def passages(self) -> PassageIndex:
        if self._index is None:
            passages = await trio.to_thread.run_sync(load_passages, self.corpus)
            self._index = await trio.to_thread.run_sync(PassageIndex, passages)
        return self._index

    async def ask(self, query: str, budget: int) -> Answer:
        started = trio.current_time()
        self.asked += 1
        subtasks = plan(query)
        await self.router.discover({t.capability for t in subtasks})
        steps = {t.name: Step(t, self.router.route(t.capability)[:MAX_ATTEMPTS]) for t in subtasks}
        passages: list[str] = []
        retrieve = steps.get("retrieve")
        if retrieve is not None and retrieve.candidates:  # only the retrieval reads the corpus
            passages = (await self.passages()).candidates(query)
        for step in steps.values():
            worst: dict[bytes, int] = {}  # a model's worst-case units, whichever peer runs it
            step.estimate = max((self._worst(step, c, query, passages, worst) for c in step.candidates), default=0)
        estimate = sum(s.estimate for s in steps.values())
        if estimate > budget:
            raise OverBudget(estimate, budget)
        results: dict[str, Any] = {}
        for wave in waves(subtasks):
            runnable = []
            for t in wave:
                if steps[t.name].candidates:
                    runnable.append(steps[t.name])
                else:
                    steps[t.name].error = f"no model with capability {t.capability!r} is reachable"
            if len(runnable) == 1:  # nothing to run beside it: no nursery needed
                await self._execute(runnable[0], query, passages, results)
            elif runnable:
                async with trio.open_nursery() as nursery:
                    for step in runnable:
                        nursery.start_soon(self._execute, step, query, passages, results)
        answer = self._compile(query, steps, passages, results)
        return Answer(query, answer, budget, estimate, sum(s.cost for s in steps.values()),
                      (trio.current_time() - started) * 1000, list(steps.values()), self.router.describe())

    def _worst(self, step: Step, c: Candidate, query: str, passages: list[str], worst: dict[bytes, int]) -> int:
        if c.local:
            return 0
        if c.model_id not in worst:
            raw = prompter.worst_case(step.task, c.spec, query, passages)
            worst[c.model_id] = max_units(c.spec, parse_input(c.spec, raw))
        return worst[c.model_id] * c.price_per_unit

    async def _execute(self, step: Step, query: str, passages: list[str], results: dict[str, Any]) -> None:
        if not step.candidates:
            step.error = f"no model with capability {step.task.capability!r} is reachable"
            return
        missing = [d for d in step.task.depends_on if d not in results]
        if missing:
            log.info("dependency failed; running without it", extra=kv(subtask=step.task.name, missing=missing))
        halted: set[bytes] = set()  # halted while this query ran: never retried on another peer
        # ranked again now: the load figures include the queries routed since this one was
        for c in sorted(step.candidates, key=self.router.rank):
            if c.model_id in halted or self.router.is_halted(c.model_id):
                step.attempts.append({"peer": str(c.peer) if c.peer else "local", "model_id": c.model_id.hex(),
                                      "error": "halted", "message": "not tried: the model is halted"})
                continue
            inputs = prompter.shape(step.task, c.spec, query, passages, results)
            split = None
            if isinstance(c.spec.config, EmbedderConfig) and "texts" in inputs:
                split = self.embeddings.split(c.model_id, c.spec.config.dim, inputs["texts"])
                step.cached = split.cached
                inputs = {**inputs, "texts": split.send}
            peer = str(c.peer) if c.peer else "local"
            started = trio.current_time()
            batch = 1
            try:
                try:
                    if c.peer is None:
                        assert c.hosted is not None
                        run = await self.tasks.run_local(c.hosted, inputs)
                        output, used, cost, receipts = run.output, units(run.usage), 0, []
                    else:
                        assert c.entry is not None
                        max_amount = max_units(c.spec, parse_input(c.spec, inputs)) * c.price_per_unit
                        out = await self.tasks.run_remote(c.peer, c.entry, inputs, max_amount)
                        output, used, cost, batch = out.output, out.charge.units, out.charge.amount, out.batch
                        receipts = [{"receipt_id": r.receipt_id.hex(), "payee": r.payee.hex(),
                                     "amount": str(r.amount)} for r in out.receipts]
                    if split is not None:
                        try:
                            output = await split.complete(output)
                        except ValueError as exc:
                            raise AgentError(f"malformed embeddings: {exc}") from None
                finally:
                    if split is not None:
                        split.release()
            except (TaskFailed, AgentError) as exc:
                code = exc.code if isinstance(exc, TaskFailed) else type(exc).__name__
                if code == "halted":
                    halted.add(c.model_id)
                step.attempts.append({"peer": peer, "model_id": c.model_id.hex(), "error": code, "message": str(exc)})
                log.info("subtask attempt failed", extra=kv(subtask=step.task.name, peer=peer, error=str(exc)))
                continue
            step.ms = (trio.current_time() - started) * 1000
            step.attempts.append({"peer": peer, "model_id": c.model_id.hex(), "error": None})
            step.model, step.model_id, step.peer = c.name, c.model_id.hex(), peer
            step.output, step.units, step.cost, step.receipts, step.batch = output, used, cost, receipts, batch
            results[step.task.name] = self._interpret(step, c.model_id, output, passages)
            step.result = results[step.task.name]
            return
        if halted and all(a["error"] == "halted" for a in step.attempts):
            step.error = "the model was halted by the circuit breaker"
        else:
            step.error = f"every provider failed ({len(step.attempts)} attempts)"

    def _interpret(self, step: Step, model_id: bytes, output: Any, passages: list[str]) -> dict[str, Any]:
        name = step.task.name
        if name == "retrieve":
            vectors = output
            if not passages or len(vectors) < 2:
                return {"passage": None, "similarity": None}
            unit = self.embeddings.unit  # a kept passage's unit vector is computed once
            units = [unit(model_id, t, v) for t, v in zip(passages, vectors[1:], strict=False)]
            scores = cosines(unit_vector(vectors[0]), units)
            best = max(range(len(scores)), key=lambda i: scores[i])
            return {"passage": passages[best], "similarity": round(scores[best], 4)}
        if name == "classify":
            label = max(output, key=lambda k: output[k])
            return {"label": label, "probability": round(output[label], 4)}
        return {"text": output}

    def _compile(self, query: str, steps: dict[str, Step], passages: list[str], results: dict[str, Any]) -> str:
        lines = []
        r = results.get("retrieve")
        if r and r.get("passage"):
            lines.append(f"Nearest passage (cosine {r['similarity']}): {r['passage']}")
        c = results.get("classify")
        if c:
            lines.append(f"Topic: {c['label']} (p={c['probability']})")
        g = results.get("generate")
        if g:
            lines.append(f"Continuation: {g['text']}")
        for s in steps.values():
            if s.error:
                lines.append(f"[{s.task.name} skipped: {s.error}]")
        return "\n".join(lines) or "no subtask could run"

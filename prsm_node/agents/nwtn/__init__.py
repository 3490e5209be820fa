"""NWTN: a query goes architect → prompter → router → executor → compiler.

- ``architect``: splits a query into a small graph of subtasks, each needing one capability.
- ``prompter``: shapes each subtask's inputs for the family of the model chosen for it.
- ``router``: finds models and peers (the ``LIST`` catalogues of connected peers and this
  node's own models) and ranks them by capability, breaker state, price, load and latency.
- ``pipeline``: checks the budget, runs the graph (independent subtasks in parallel, locally
  or over ``/prsm/task/1.0.0``, retrying on another provider on failure) and compiles the
  answer with its trace.
"""

from __future__ import annotations

from .architect import Subtask, plan
from .pipeline import Answer, OverBudget, Pipeline

__all__ = ["Answer", "OverBudget", "Pipeline", "Subtask", "plan"]

"""NWTN agents: the model runtime that hosts and runs models on this node (torch, on ``cuda``
when present, else CPU).

Importing this package never imports torch; the first ``ModelRuntime.load()`` does, in a
worker thread. A model is a spec (``{"name": family, "config": {...}}``, see ``specs.py``) and
safetensors weights; the families are built in (``architectures.py``), never code from the
network. Typical use::

    async with open_runtime(RuntimeConfig()) as runtime:
        await runtime.load("opticks-lm", spec, "models/lm/")
        result = await runtime.run("opticks-lm", {"prompt": "Light is", "max_new_tokens": 40})
        result.output, result.usage
"""

from __future__ import annotations

from .exceptions import (
    AgentError,
    DeviceUnavailable,
    InferenceFailed,
    InvalidInput,
    InvalidSpec,
    InvalidWeights,
    MemoryBudgetExceeded,
    ModelAlreadyLoaded,
    ModelNotLoaded,
    ModelUnloaded,
    RuntimeBusy,
    RuntimeClosed,
)
from .inputs import ClassifyInput, EmbedInput, GenerateInput, RunResult, Usage, parse_input
from .runtime import ModelInfo, ModelRuntime, ModelStatistics, RuntimeConfig, RuntimeStatistics, open_runtime
from .specs import (
    CLASSIFIER_FAMILY,
    EMBEDDER_FAMILY,
    FAMILY_NAMES,
    FAMILY_TAGS,
    LM_FAMILY,
    MAX_PARAMS,
    ModelSpec,
    parse_spec,
)

__all__ = [
    "CLASSIFIER_FAMILY",
    "EMBEDDER_FAMILY",
    "FAMILY_NAMES",
    "FAMILY_TAGS",
    "LM_FAMILY",
    "MAX_PARAMS",
    "AgentError",
    "ClassifyInput",
    "DeviceUnavailable",
    "EmbedInput",
    "GenerateInput",
    "InferenceFailed",
    "InvalidInput",
    "InvalidSpec",
    "InvalidWeights",
    "MemoryBudgetExceeded",
    "ModelAlreadyLoaded",
    "ModelInfo",
    "ModelNotLoaded",
    "ModelRuntime",
    "ModelSpec",
    "ModelStatistics",
    "ModelUnloaded",
    "RunResult",
    "RuntimeBusy",
    "RuntimeClosed",
    "RuntimeConfig",
    "RuntimeStatistics",
    "Usage",
    "open_runtime",
    "parse_input",
    "parse_spec",
]

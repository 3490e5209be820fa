"""Errors of the model runtime. Every one derives from AgentError.

``InvalidSpec`` and ``InvalidWeights`` mean "this model cannot be loaded as published": the
manifest or its files are wrong, not this node. ``InvalidInput`` is the requester's fault and
goes back to them as is. ``MemoryBudgetExceeded`` and ``RuntimeBusy`` are this node's limits:
try another peer or later. ``ModelNotLoaded`` and ``ModelUnloaded`` are about the model's
presence on this node.
"""

from __future__ import annotations

from ..exceptions import PrsmError


class AgentError(PrsmError):
    """Root of every error raised on purpose by prsm_node.agents."""


class InvalidSpec(AgentError):
    """Raised when a model spec ({"name": family, "config": {...}}) names an unknown family,
    carries an unknown key, a value of the wrong type or out of range, or a model over the
    size caps (parameters, layers, widths, vocabulary, context)."""


class InvalidWeights(AgentError):
    """Raised when safetensors files do not hold exactly the tensors a spec expects: a missing,
    extra, duplicated, mis-shaped or wrongly typed tensor, a malformed header, or no file."""


class InvalidInput(AgentError):
    """Raised when the inputs of a request do not fit the model's family: an unknown or missing
    key, a wrong type, or a value out of range (too many tokens, texts or dimensions)."""


class MemoryBudgetExceeded(AgentError):
    """Raised when a model's parameter bytes plus its working estimate do not fit in the memory
    budget, even after evicting every idle model."""

    def __init__(self, needed: int, available: int, limit: int) -> None:
        super().__init__(f"model needs {needed} bytes; {available} of {limit} free after evicting idle models")
        self.needed = needed
        self.available = available
        self.limit = limit


class ModelNotLoaded(AgentError):
    """Raised when a request names a model id that this runtime has not loaded."""


class ModelAlreadyLoaded(AgentError):
    """Raised when load() is given a model id that is already loaded (unload it first)."""


class ModelUnloaded(AgentError):
    """Raised to a request whose model was unloaded (by unload(), e.g. for a circuit-breaker
    halt) before its result was delivered."""


class RuntimeBusy(AgentError):
    """Raised when a model's request queue is full; the requester should try later."""


class RuntimeClosed(AgentError):
    """Raised when the runtime is used before serve() started it or after it stopped."""


class DeviceUnavailable(AgentError):
    """Raised when the config forces a device (``cuda``) that this machine does not have."""


class InferenceFailed(AgentError):
    """Raised to every request of a batch whose forward pass raised (e.g. the device ran out of
    memory); the model stays loaded and later batches run as usual."""

"""Errors of the model exchange. Every one derives from ExchangeError.

Errors about one provider (``RemoteError``, ``ProtocolViolation``, ``Unreachable``) are handled
inside a fetch: the provider is penalised or dropped and its work goes to the others. A fetch as
a whole ends with ``FetchFailed`` (or ``NoProviders``), which the control methods report.
"""

from __future__ import annotations

from ..exceptions import PrsmError
from ..shards import ErrorCode


class ExchangeError(PrsmError):
    """Root of every error raised on purpose by prsm_node.exchange."""


class RemoteError(ExchangeError):
    """Raised when a provider answers a request with ``ERROR``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name.lower()}: {message}")
        self.code = code
        self.message = message


class ProtocolViolation(ExchangeError):
    """Raised when a provider breaks the protocol: an unexpected message type, a chunk index it
    was not asked for or out of order, an undecodable frame, a manifest that does not hash to
    its id."""


class Unreachable(ExchangeError):
    """Raised when no stream to a provider can be opened (not connected, not found, refused)."""


class FetchFailed(ExchangeError):
    """Raised when a fetch cannot complete: the manifest is invalid or nowhere to be found, no
    reachable provider holds some chunk, the quota is full, or the assembled files are wrong."""


class ModelHalted(FetchFailed):
    """Raised when a fetch is asked for, or runs into, a model the circuit breaker halted."""


class NoProviders(FetchFailed):
    """Raised when no peer serves the manifest, or none holds some of its chunks."""


class FetchBusy(ExchangeError):
    """Raised when an operation needs a model that a running fetch is writing (``model rm``)."""


class NameNotFound(ExchangeError):
    """Raised when a model name (or name:version) resolves to no manifest."""

"""PBFT parameters (protocols/pbft.md, "Parameters"). All validators of a chain use the same
K and L (they shape the VIEW-CHANGE and NEW-VIEW contents); timeouts and batch limits are
local policy but SHOULD match too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .exceptions import ConfigurationError
from .messages import MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, MAX_LOG_WINDOW


@dataclass(frozen=True)
class PbftParams:
    checkpoint_interval: int = 16
    """K: a CHECKPOINT is sent after executing every seq that is a multiple of K."""
    log_window: int = 32
    """L: a replica accepts seq n only when h < n <= h + L (h = last stable checkpoint)."""
    view_change_timeout: float = 2.0
    """Base timeout (seconds) for a request to commit before voting for a view change."""
    max_view_change_timeout: float = 60.0
    """Cap of the doubling timeout after consecutive failed view changes."""
    status_interval: float = 0.5
    """How often (seconds) a replica that waits for something sends STATUS / retransmits."""
    max_batch_requests: int = 1024
    max_batch_bytes: int = 1024 * 1024

    @classmethod
    def for_tests(cls) -> PbftParams:
        """Small windows and short timeouts, for unit tests and the simulation."""
        return cls(
            checkpoint_interval=4,
            log_window=8,
            view_change_timeout=1.0,
            max_view_change_timeout=8.0,
            status_interval=0.25,
            max_batch_requests=16,
            max_batch_bytes=64 * 1024,
        )

    def validate(self) -> None:
        k, window = self.checkpoint_interval, self.log_window
        if type(k) is not int or k < 1:
            raise ConfigurationError(f"[consensus].checkpoint_interval must be a positive integer, got {k!r}")
        if type(window) is not int or window < 2 * k or window % k or window > MAX_LOG_WINDOW:
            raise ConfigurationError(
                f"[consensus].log_window must be a multiple of checkpoint_interval, at least twice it "
                f"and at most {MAX_LOG_WINDOW}, got {window!r}"
            )
        if not 0 < self.view_change_timeout <= self.max_view_change_timeout:
            raise ConfigurationError("[consensus].view_change_timeout must be > 0 and <= max_view_change_timeout")
        if not 0 < self.status_interval:
            raise ConfigurationError("[consensus].status_interval must be > 0")
        if not 1 <= self.max_batch_requests <= MAX_BATCH_REQUESTS:
            raise ConfigurationError(f"[consensus].max_batch_requests must be in 1..{MAX_BATCH_REQUESTS}")
        if not 1 <= self.max_batch_bytes <= MAX_BATCH_BYTES:
            raise ConfigurationError(f"[consensus].max_batch_bytes must be in 1..{MAX_BATCH_BYTES}")

    def timeout(self, failed_view_changes: int) -> float:
        """The view-change timeout after ``failed_view_changes`` consecutive view changes
        without progress: base, base, 2 base, 4 base, ... capped at the maximum."""
        exponent = max(failed_view_changes - 1, 0)
        if exponent >= 64:
            return self.max_view_change_timeout
        return float(min(self.view_change_timeout * (1 << exponent), self.max_view_change_timeout))

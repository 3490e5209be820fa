"""Errors of the daemon. Every error we raise on purpose derives from PrsmError."""

from __future__ import annotations


class PrsmError(Exception):
    """Root of every error raised on purpose by prsm_node."""


class ConfigError(PrsmError):
    """Raised when config.toml, a flag or genesis.json holds a value we cannot use.

    The message names the section and key (``[p2p].listen[0]``) so a user can fix it.
    """


class HomeError(PrsmError):
    """Raised when the home directory is missing, incomplete or would be overwritten."""


class KeyFileError(HomeError):
    """Raised when the node key file is missing, corrupt or readable by others."""


class LockedError(PrsmError):
    """Raised when another daemon already holds the home's node.lock."""


class ListenError(PrsmError):
    """Raised when the host cannot listen on a configured address (in use, not local, …)."""


class StoreError(PrsmError):
    """Raised when the LevelDB store cannot be opened or read."""


class DaemonNotRunning(PrsmError):
    """Raised when a command needs the daemon and its control socket does not answer."""


class ControlError(PrsmError):
    """Raised on the client side when the daemon answers a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DiscoveryError(PrsmError):
    """Raised when a Kademlia lookup cannot complete (no peers, or the target is not found)."""

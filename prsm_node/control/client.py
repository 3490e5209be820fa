"""The CLI side of the control socket: plain blocking sockets, no trio or libp2p import,
so ``prsm-node status`` answers quickly."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from typing import Any

from ..exceptions import ControlError, DaemonNotRunning

_ids = itertools.count(1)


class ControlClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            home = self.path.parent
            raise DaemonNotRunning(
                f"no prsm-node is running on {home} (no answer on {self.path}); "
                f"start one with `prsm-node start --home {home}`"
            ) from None
        except OSError as exc:
            sock.close()
            raise DaemonNotRunning(
                f"cannot open {self.path}: {exc.strerror}"
                + (" (the socket belongs to another user)" if isinstance(exc, PermissionError) else "")
            ) from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.settimeout(timeout if timeout is not None else self.timeout)
        req_id = next(_ids)
        line = json.dumps({"id": req_id, "method": method, "params": params or {}}) + "\n"
        self._sock.sendall(line.encode())
        response = json.loads(self._read_line())
        if "error" in response:
            err = response["error"]
            raise ControlError(err.get("code", "unknown"), err.get("message", ""))
        return response["result"]

    def _read_line(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise DaemonNotRunning(f"the daemon closed {self.path} before answering")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


def call(home: Path, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    with ControlClient(home / "control.sock", timeout) as client:
        return client.call(method, params)

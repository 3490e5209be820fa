"""The daemon side of the control socket.

One JSON request per line, ``{"id": …, "method": "…", "params": {…}}``, answered by one line,
``{"id": …, "result": …}`` or ``{"id": …, "error": {"code": "…", "message": "…"}}``. A line
over the size limit, bad JSON, an unknown method or bad params each get a structured error and
the connection stays usable. The socket file is created with mode 0600.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .._trio import TaskStatus
from ..logs import kv

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_CONNECTIONS = 1024  # served at once (``[control].max_connections``): each is one request in progress
LISTEN_BACKLOG = 128  # connections the kernel holds before they are accepted; a full backlog refuses more


class RequestError(Exception):
    """Raised by a method handler to answer with a structured error instead of a result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class AfterReply:
    """A handler result whose ``then`` runs once the reply has been sent (e.g. ``stop``)."""

    result: Any
    then: Callable[[], None]


def param(params: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """Fetch and type-check one request parameter, or raise ``invalid_params``."""
    if name not in params:
        if default is ...:
            raise RequestError("invalid_params", f"missing parameter {name!r}")
        return default
    value = params[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError("invalid_params", f"parameter {name!r} must be {kind.__name__}")
    return value


class ControlServer:
    def __init__(self, path: Path, max_request_bytes: int, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = path
        self.max_request_bytes = max_request_bytes
        self._methods: dict[str, Handler] = {}
        self._slots = trio.CapacityLimiter(max_connections)

    def register(self, name: str, handler: Handler) -> None:
        if name in self._methods:
            raise ValueError(f"control method {name!r} registered twice")
        self._methods[name] = handler

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        # We hold node.lock, so a socket file left here is stale (from a crash): remove it.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for other users
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(LISTEN_BACKLOG)
        listener = trio.SocketListener(sock)
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn = await listener.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                            log.warning("control socket out of resources", extra=kv(error=str(exc)))
                            await trio.sleep(0.1)
                            continue
                        raise
                    nursery.start_soon(self._serve_connection, conn)
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _serve_connection(self, conn: trio.SocketStream) -> None:
        async with self._slots, conn:
            buf = bytearray()
            discarding = False
            try:
                while True:
                    chunk = await conn.receive_some(65536)
                    if not chunk:
                        return
                    if discarding:  # drop the rest of an oversized line, already answered
                        nl = chunk.find(b"\n")
                        if nl < 0:
                            continue
                        chunk, discarding = chunk[nl + 1 :], False
                    buf += chunk
                    while True:
                        nl = buf.find(b"\n")
                        if nl < 0:
                            break
                        line, buf = bytes(buf[:nl]), buf[nl + 1 :]
                        reply, then = await self._answer(line)
                        await conn.send_all(reply)
                        if then is not None:
                            then()
                    if len(buf) > self.max_request_bytes:
                        await conn.send_all(
                            _encode(
                                {
                                    "id": None,
                                    "error": {
                                        "code": "request_too_large",
                                        "message": f"request exceeds {self.max_request_bytes} bytes",
                                    },
                                }
                            )
                        )
                        buf.clear()
                        discarding = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _answer(self, line: bytes) -> tuple[bytes, Callable[[], None] | None]:
        """The reply line for one request, and what to run once it is sent."""
        if len(line) > self.max_request_bytes:
            return _error(None, "request_too_large", f"request exceeds {self.max_request_bytes} bytes"), None
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(None, "parse_error", f"request is not valid JSON: {exc}"), None
        if not isinstance(request, dict):
            return _error(None, "invalid_request", "request must be a JSON object"), None
        req_id = request.get("id")
        if req_id is not None and (not isinstance(req_id, (str, int)) or isinstance(req_id, bool)):
            return _error(None, "invalid_request", "id must be a string or an integer"), None
        method = request.get("method")
        params = request.get("params", {})
        if not isinstance(method, str):
            return _error(req_id, "invalid_request", "method must be a string"), None
        if not isinstance(params, dict):
            return _error(req_id, "invalid_request", "params must be an object"), None
        handler = self._methods.get(method)
        if handler is None:
            known = ", ".join(self.methods)
            return _error(req_id, "unknown_method", f"unknown method {method!r}; known: {known}"), None
        try:
            result = await handler(params)
        except RequestError as exc:
            return _error(req_id, exc.code, exc.message), None
        except Exception as exc:
            log.exception("control method failed", extra=kv(method=method))
            return _error(req_id, "internal", f"{type(exc).__name__}: {exc}"), None
        if isinstance(result, AfterReply):
            return _encode({"id": req_id, "result": result.result}), result.then
        return _encode({"id": req_id, "result": result}), None


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _error(req_id: Any, code: str, message: str) -> bytes:
    return _encode({"id": req_id, "error": {"code": code, "message": message}})

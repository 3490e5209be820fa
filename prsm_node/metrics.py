"""Prometheus metrics in the text exposition format, over HTTP on a loopback port.

The format is a handful of ``name value`` lines, so a tiny trio responder serves it; it answers
GET /metrics and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ._trio import TaskStatus
from .logs import kv

log = logging.getLogger(__name__)

# (name, type, help, read the current value)
Gauge = tuple[str, str, str, Callable[[], float]]
MAX_REQUEST_HEAD = 8192


def render(gauges: list[Gauge]) -> str:
    lines = []
    for name, kind, help_text, read in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {read()}"]
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, listen: str, gauges: list[Gauge]) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.gauges = gauges
        self.bound_port: int | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.bound_port = listeners[0].socket.getsockname()[1]
        log.info("metrics served", extra=kv(url=f"http://{self.host}:{self.bound_port}/metrics"))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started()

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                head = b""
                with trio.move_on_after(5):
                    while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        head += chunk
                request_line = head.split(b"\r\n", 1)[0].split()
                if len(request_line) >= 2 and request_line[0] == b"GET" and request_line[1] == b"/metrics":
                    body = render(self.gauges).encode()
                    status, ctype = b"200 OK", b"text/plain; version=0.0.4"
                else:
                    body, status, ctype = b"not found: try GET /metrics\n", b"404 Not Found", b"text/plain"
                await stream.send_all(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: "
                    + ctype
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
